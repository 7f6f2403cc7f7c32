"""Qwen2 architecture config: read from an HF ``config.json``, mapped to Megatron's TransformerConfig."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)
VOCAB_PAD_MULTIPLE = 128  # Megatron's make_vocab_size_divisible_by; multiplied by TP

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16, with a clear error otherwise."""
    if isinstance(name, torch.dtype):
        return name
    aliases = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[key]


class ConfigKeyError(ValueError):
    """A required key is missing from, or invalid in, an HF config.json."""


RECOMPUTE_GRANULARITIES = (None, "selective", "full")
RECOMPUTE_METHODS = (None, "uniform", "block")
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")  # Megatron 0.16.1's dense-model choices


@dataclass(frozen=True)
class ActivationOptions:
    """How activations are laid out and kept in training (Megatron-Core's names and meanings).

    - ``sequence_parallel``: between tensor-parallel regions (norms, residuals, dropout) the
      activations are sharded over the TP ranks along the sequence. A no-op at TP=1.
    - ``recompute_granularity``: ``None``; ``"selective"`` (recompute ``recompute_modules`` in the
      backward, e.g. ``["core_attn"]``); ``"full"`` (keep only each recompute unit's input:
      ``recompute_method`` ``"uniform"`` = units of ``recompute_num_layers`` layers, ``"block"`` =
      the first ``recompute_num_layers`` layers one by one).
    """

    sequence_parallel: bool = False
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    recompute_modules: tuple[str, ...] = ("core_attn",)

    def __post_init__(self) -> None:
        def bad(key: str, got: Any, want: str) -> ValueError:
            return ValueError(f"{key}={got!r} is invalid: expected {want}")

        if not isinstance(self.sequence_parallel, bool):
            raise bad("sequence_parallel", self.sequence_parallel, "true or false")
        if self.recompute_granularity not in RECOMPUTE_GRANULARITIES:
            raise bad("recompute_granularity", self.recompute_granularity, "null, 'selective' or 'full'")
        if self.recompute_method not in RECOMPUTE_METHODS:
            raise bad("recompute_method", self.recompute_method, "null, 'uniform' or 'block'")
        unknown = sorted(set(self.recompute_modules) - set(RECOMPUTE_MODULES))
        if unknown:
            raise bad(
                "recompute_modules", list(self.recompute_modules), f"a subset of {list(RECOMPUTE_MODULES)}"
            )
        if self.recompute_granularity == "full":
            if self.recompute_method is None or not isinstance(self.recompute_num_layers, int):
                raise ValueError(
                    "recompute_granularity='full' needs recompute_method ('uniform' or 'block') and "
                    f"recompute_num_layers (an int >= 1), got {self.recompute_method!r} and "
                    f"{self.recompute_num_layers!r}"
                )
            if self.recompute_num_layers < 1:
                raise bad("recompute_num_layers", self.recompute_num_layers, "an int >= 1")
        elif self.recompute_method is not None or self.recompute_num_layers is not None:
            raise ValueError(
                "recompute_method / recompute_num_layers apply to recompute_granularity='full' only, "
                f"got recompute_granularity={self.recompute_granularity!r}"
            )
        if self.recompute_granularity == "selective" and not self.recompute_modules:
            raise bad("recompute_modules", [], "at least one module with recompute_granularity='selective'")

    def megatron_kwargs(self, tp: int, num_layers: int) -> dict[str, Any]:
        """TransformerConfig fields for these options at tensor parallel ``tp``."""
        if self.recompute_granularity == "full" and self.recompute_num_layers > num_layers:
            raise ValueError(
                f"recompute_num_layers={self.recompute_num_layers} exceeds the model's {num_layers} layers"
            )
        kw: dict[str, Any] = {"sequence_parallel": self.sequence_parallel and tp > 1}
        if self.recompute_granularity is not None:
            kw.update(
                recompute_granularity=self.recompute_granularity,
                recompute_method=self.recompute_method,
                recompute_num_layers=self.recompute_num_layers,
                recompute_modules=list(self.recompute_modules),
            )
        return kw


@dataclass(frozen=True)
class QwenConfig:
    """The fields of an HF Qwen2 config that define the network (all that Megatron needs)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    initializer_range: float = 0.02
    head_dim: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None  # HF: nn.Embedding(padding_idx=...): that row's lookup never trains
    torch_dtype: str = "bfloat16"
    # The untouched HF dict, written back on export so nothing the user had is lost.
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> QwenConfig:
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and model_type != "qwen2":
            raise ConfigKeyError(
                f"{source}: unsupported architecture {archs or model_type!r}; "
                f"expected one of {list(SUPPORTED_ARCHITECTURES)} (model_type 'qwen2')"
            )

        def need(key: str) -> Any:
            if key not in d or d[key] is None:
                raise ConfigKeyError(f"{source}: missing required key {key!r}")
            return d[key]

        # transformers 5 moved rope_theta into rope_parameters; accept both.
        rope = d.get("rope_parameters") or {}
        rope_theta = d.get("rope_theta", rope.get("rope_theta"))
        if rope_theta is None:
            raise ConfigKeyError(f"{source}: missing required key 'rope_theta'")
        rope_type = (d.get("rope_scaling") or rope or {}).get("rope_type", "default")
        if rope_type not in ("default", None):
            raise ConfigKeyError(f"{source}: rope scaling {rope_type!r} is not supported")
        if d.get("use_sliding_window"):
            raise ConfigKeyError(f"{source}: use_sliding_window=true is not supported")
        cfg = cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=int(need("hidden_size")),
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=int(need("num_attention_heads")),
            num_key_value_heads=int(d.get("num_key_value_heads") or need("num_attention_heads")),
            max_position_embeddings=int(need("max_position_embeddings")),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(need("rms_norm_eps")),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            initializer_range=float(d.get("initializer_range", 0.02)),
            head_dim=d.get("head_dim"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"),
            hf_config=dict(d),
        )
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigKeyError(
                f"{source}: num_attention_heads={cfg.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={cfg.num_key_value_heads}"
            )
        if cfg.head_dim is None and cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigKeyError(
                f"{source}: hidden_size={cfg.hidden_size} is not divisible by "
                f"num_attention_heads={cfg.num_attention_heads} and no head_dim is given"
            )
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> QwenConfig:
        """Read ``config.json`` (or a model dir holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no HF config at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigKeyError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF config.json content: the original dict with our fields written over it."""
        out = dict(self.hf_config)
        out.update({k: v for k, v in asdict(self).items() if k != "hf_config" and v is not None})
        out.setdefault("architectures", ["Qwen2ForCausalLM"])
        out.setdefault("model_type", "qwen2")
        out.setdefault("hidden_act", "silu")
        return out

    # ---- parallel layout ---------------------------------------------------------------
    def check_tp(self, tp: int) -> None:
        """Raise a clear error if this TP size cannot shard the attention heads and KV groups."""
        problems = []
        if self.num_attention_heads % tp:
            problems.append(f"num_attention_heads={self.num_attention_heads}")
        if self.num_key_value_heads % tp:
            problems.append(f"num_key_value_heads={self.num_key_value_heads}")
        if self.intermediate_size % tp:
            problems.append(f"intermediate_size={self.intermediate_size}")
        if problems:
            ok = [t for t in range(1, self.num_key_value_heads + 1) if self._tp_fits(t)]
            raise ValueError(
                f"tensor_parallel={tp} does not divide {', '.join(problems)}; "
                f"valid tensor_parallel sizes for this model: {ok}"
            )

    def _tp_fits(self, tp: int) -> bool:
        return not (
            self.num_attention_heads % tp or self.num_key_value_heads % tp or self.intermediate_size % tp
        )

    def padded_vocab_size(self, tp: int) -> int:
        """Vocab rounded up to a multiple of 128 * TP (Megatron's rule). Padded rows never reach
        sampling, losses or logprobs: see ``engine.batching.logprobs`` which masks them."""
        multiple = VOCAB_PAD_MULTIPLE * tp
        return -(-self.vocab_size // multiple) * multiple

    # ---- Megatron ----------------------------------------------------------------------
    def transformer_config(
        self,
        tp: int,
        params_dtype: torch.dtype = torch.float32,
        use_cpu_initialization: bool | None = None,
        perform_initialization: bool = True,
        activations: ActivationOptions | None = None,
    ):
        """The Megatron-Core TransformerConfig for this architecture at tensor parallel ``tp``, with
        ``activations`` (sequence parallelism, recomputation; default: neither)."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        self.check_tp(tp)
        extra = (activations or ActivationOptions()).megatron_kwargs(tp, self.num_hidden_layers)
        on_gpu = torch.cuda.is_available()
        return TransformerConfig(
            num_layers=self.num_hidden_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_key_value_heads,
            kv_channels=self.kv_channels,
            normalization="RMSNorm",
            layernorm_epsilon=self.rms_norm_eps,
            gated_linear_unit=True,  # SwiGLU: silu(gate) * up
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=True,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.initializer_range,
            tensor_model_parallel_size=tp,
            params_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
            use_cpu_initialization=(not on_gpu) if use_cpu_initialization is None else use_cpu_initialization,
            perform_initialization=perform_initialization,
            # Megatron's fused softmax is a separately built CUDA extension (apex-style): use it only
            # when importable (a stock PyTorch GPU image lacks it; measured on an H200 machine).
            masked_softmax_fusion=on_gpu
            and importlib.util.find_spec("scaled_masked_softmax_cuda") is not None,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            attention_softmax_in_fp32=True,
            **extra,
        )
