"""Helpers for torchrun worker scripts: tiny HF Qwen2 models, their Megatron copies, the generator-vs-trainer
logprob check, and a results recorder."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# name -> (vocab, hidden, ffn, layers, heads, kv_heads, tied)
TINY_VARIANTS = {
    "gqa_untied_v300": (300, 64, 96, 2, 4, 2, False),  # vocab not a multiple of 128*TP
    "gqa_tied_v512": (512, 64, 96, 2, 4, 2, True),
    "mha_untied_v257": (257, 64, 80, 2, 4, 4, False),
}


def tiny_hf_config(variant: str = "gqa_untied_v300", **overrides):
    from transformers import Qwen2Config

    v, h, f, n, heads, kv, tied = TINY_VARIANTS[variant]
    kw = dict(
        vocab_size=v, hidden_size=h, intermediate_size=f, num_hidden_layers=n,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied, bos_token_id=1,
        eos_token_id=2, torch_dtype="float32",
    )  # fmt: skip
    kw.update(overrides)
    return Qwen2Config(**kw)


def tiny_hf_model(variant: str = "gqa_untied_v300", seed: int = 0, **overrides):
    """A random HF Qwen2ForCausalLM (fp32, eager attention), identical on every rank for a seed."""
    from transformers import Qwen2ForCausalLM

    cfg = tiny_hf_config(variant, **overrides)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).float()
    # HF initialises norms to 1 and biases to 0: randomise them so the mapping is really tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model.eval()


def megatron_from_hf(hf, cfg=None, activations=None) -> torch.nn.Module:
    """A GPTModel at the current TP layout holding ``hf``'s weights (``cfg``: its QwenConfig, derived
    from ``hf.config`` when None)."""
    from models.qwen.config import QwenConfig
    from models.qwen.hf_mapping import state_dict_reader
    from models.qwen.model import build_model, load_hf_weights

    cfg = cfg or QwenConfig.from_hf_dict(hf.config.to_dict())
    model = build_model(cfg, activations=activations)
    load_hf_weights(model, cfg, state_dict_reader(hf.state_dict(), cfg))
    return model


def trainer_logprob_error(
    model, vocab_size: int, prompts, out, n: int, temperature: float, pad: int
) -> float:
    """max |generator logprob - trainer logprob| over ``out`` (``n`` completions per prompt), the trainer's
    computed by ``completion_logprobs`` in micro-batches of 4 rows."""
    from engine.batching.logprobs import completion_logprobs
    from engine.batching.micro_batches import build_micro_batch

    rows = [p for p in prompts for _ in range(n)]
    worst = 0.0
    for st in range(0, len(rows), 4):
        mb = build_micro_batch(rows[st : st + 4], out.completion_ids[st : st + 4], slice(st, st + 4), pad)
        with torch.no_grad():
            lp, _ = completion_logprobs(model, mb, vocab_size, temperature=temperature)
        for j, glp in enumerate(out.logprobs[st : st + 4]):
            worst = max(worst, float((lp[j, : len(glp)] - torch.tensor(glp)).abs().max()))
    return worst


class Results:
    """Collects named checks; rank 0 writes them all. A crashing check is recorded, not fatal."""

    def __init__(self) -> None:
        p = argparse.ArgumentParser()
        p.add_argument("--out", required=True)
        self.args, self.extra = p.parse_known_args()
        self.out = Path(self.args.out)
        self.items: dict[str, dict] = {}

    @property
    def tp(self) -> int:
        """The ``--tp`` argument (1 when absent)."""
        return int(self.extra[self.extra.index("--tp") + 1]) if "--tp" in self.extra else 1

    @classmethod
    def start(cls, seed: int = 1234) -> Results:
        """A worker's start: parse the arguments, init torch.distributed + Megatron at ``--tp``, 1 thread."""
        from parallel.distributed import init_distributed

        res = cls()
        init_distributed(tp=res.tp, seed=seed)
        torch.set_num_threads(1)
        return res

    def record(self, name: str, ok: bool, **info) -> None:
        info = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in info.items()}
        prev = self.items.get(name)
        if prev is not None:  # several ranks / sub-checks: all must pass
            ok = ok and prev["ok"]
        self.items[name] = {"ok": bool(ok), **info}

    def close(self, rel_to: float, name: str, got: torch.Tensor, want: torch.Tensor, **info) -> float:
        """Record max |got - want| / max(|want|, tiny) <= rel_to."""
        err = float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-12))
        self.record(name, err <= rel_to, rel_err=err, tol=rel_to, **info)
        return err

    def run(self, name: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - report and carry on with the other checks
            self.record(name, False, error=f"{type(e).__name__}: {e}", tb=traceback.format_exc()[-3000:])
            return None

    def finish(self) -> None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        gathered = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, self.items)
        else:
            gathered = [self.items]
        merged: dict[str, dict] = {}
        for rank, items in enumerate(gathered):
            for k, v in items.items():
                if k not in merged or not v["ok"]:
                    merged[k] = {**v, "rank": rank} if not v["ok"] else v
        if not dist.is_initialized() or dist.get_rank() == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "results.json").write_text(json.dumps(merged, indent=1, default=str))
        # Tear the process groups down before interpreter exit: a gloo group left to the exit-time
        # destructors aborted one rank in CI ("terminate called without an active exception").
        if dist.is_initialized():
            from parallel.distributed import destroy_distributed

            dist.barrier()
            destroy_distributed()
