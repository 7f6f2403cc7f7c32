"""Qwen2 config mapping, TP validation, vocab padding and memory estimates (single process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.qwen.config import ConfigKeyError, QwenConfig
from models.qwen.hf_mapping import hf_to_mcore_shard, merge_tp_shards, rules, split_tp, state_dict_reader
from models.qwen.memory import decode_weight_bytes, estimate, kv_bytes_per_token, param_count, params_per_rank

REAL = Path(__file__).resolve().parents[1] / "configs/models/deepseek-r1-distill-qwen-1.5b.json"


@pytest.fixture(scope="module")
def real() -> QwenConfig:
    return QwenConfig.from_file(REAL)


def test_real_config_fields(real):
    assert (real.num_hidden_layers, real.hidden_size, real.num_attention_heads) == (28, 1536, 12)
    assert (real.num_key_value_heads, real.intermediate_size, real.vocab_size) == (2, 8960, 151936)
    assert real.rope_theta == 10000 and real.rms_norm_eps == 1e-6 and not real.tie_word_embeddings
    assert real.kv_channels == 128 and real.heads_per_group == 6


def test_real_param_count_and_memory(real):
    # 1,777,088,000: the published size of DeepSeek-R1-Distill-Qwen-1.5B ("1.78B").
    assert param_count(real) == 1_777_088_000
    # TP=2 per-rank count equals what a meta-device build holds (asserted in the TP=2 launch).
    assert params_per_rank(real, 2) == 888_784_384
    e = estimate(real, tp=2, dp=2, params_dtype=torch.bfloat16)
    n = e.params_per_rank
    assert e.weights_bytes == 2 * n and e.grads_bytes == 4 * n
    assert e.master_bytes == 4 * n // 2 and e.adam_bytes == 8 * n // 2


def test_real_decode_bytes(real):
    # Per layer: q/k/v with biases, o, gate/up/down, two norms; then the final norm and the untied LM head.
    h, kv, f, V, L = 1536, 2 * 128, 8960, 151936, 28
    layer = h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * f + 2 * h
    assert decode_weight_bytes(real, 1, torch.bfloat16) == 2 * (L * layer + h + V * h)  # 3.09 GB
    assert kv_bytes_per_token(real, 1, torch.bfloat16) == L * 2 * 2 * 128 * 2  # K and V, 2 KV heads
    assert kv_bytes_per_token(real, 2, torch.bfloat16) == L * 2 * 1 * 128 * 2
    tied = QwenConfig.from_hf_dict({**real.hf_config, "tie_word_embeddings": True})
    assert decode_weight_bytes(tied, 1, torch.float32) == 4 * (
        L * layer + h + V * h
    )  # tied head read in full


def test_bench_decode_read_bytes_counts_every_cached_position(real):
    from tools.bench_generate import decode_read_bytes

    prompts, lengths = [5, 5, 9], [1, 4, 7]
    steps = max(lengths) - 1
    positions = 0
    for k in range(2, max(lengths) + 1):  # token k of a row is decoded over its P + k - 1 cached positions
        positions += sum(P + k - 1 for P, n in zip(prompts, lengths, strict=True) if n >= k)
    want = steps * decode_weight_bytes(real, 1, torch.bfloat16) + positions * kv_bytes_per_token(
        real, 1, torch.bfloat16
    )
    assert decode_read_bytes(real, 1, torch.bfloat16, steps, prompts, lengths) == want


def test_transformer_config_mapping(real):
    t = real.transformer_config(tp=2)
    assert t.num_query_groups == 2 and t.kv_channels == 128 and t.ffn_hidden_size == 8960
    assert t.normalization == "RMSNorm" and t.gated_linear_unit and t.add_qkv_bias and not t.add_bias_linear
    assert t.layernorm_epsilon == 1e-6 and t.tensor_model_parallel_size == 2


@pytest.mark.parametrize(
    ("vocab", "tp", "padded"), [(151936, 1, 151936), (151936, 2, 152064), (300, 2, 512), (257, 1, 384)]
)
def test_vocab_padding(real, vocab, tp, padded):
    cfg = QwenConfig.from_hf_dict({**real.hf_config, "vocab_size": vocab})
    assert cfg.padded_vocab_size(tp) == padded


@pytest.mark.parametrize("tp", [4, 3, 5])
def test_tp_that_does_not_divide_heads_is_a_clear_error(real, tp):
    with pytest.raises(
        ValueError, match=rf"tensor_parallel={tp} does not divide .*num_key_value_heads=2"
    ) as e:
        real.check_tp(tp)
    assert "valid tensor_parallel sizes for this model: [1, 2]" in str(e.value)


def test_unknown_architecture(tmp_path, real):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({**real.hf_config, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(ConfigKeyError, match=r"config.json: unsupported architecture \['LlamaForCausalLM'\]"):
        QwenConfig.from_file(p)


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "rms_norm_eps", "rope_theta"])
def test_missing_key(tmp_path, real, key):
    d = dict(real.hf_config)
    del d[key]
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigKeyError, match=rf"missing required key '{key}'"):
        QwenConfig.from_file(p)


def test_rope_theta_in_rope_parameters_transformers5(real):
    d = {k: v for k, v in real.hf_config.items() if k != "rope_theta"}
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    assert QwenConfig.from_hf_dict(d).rope_theta == 1e6


def test_hf_dict_round_trip(real):
    assert QwenConfig.from_hf_dict(real.to_hf_dict()) == real


def small_cfg(layers: int) -> QwenConfig:
    """GQA (4 heads / 2 KV), vocab 300 (needs padding at any TP), untied."""
    return QwenConfig.from_hf_dict(
        {
            "architectures": ["Qwen2ForCausalLM"], "vocab_size": 300, "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 64, "rope_theta": 1e4,
            "rms_norm_eps": 1e-6,
        }
    )  # fmt: skip


def _random_hf_state(cfg: QwenConfig) -> dict[str, torch.Tensor]:
    from models.qwen.hf_mapping import hf_names, hf_shape

    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(hf_shape(cfg, n), generator=g) for n in hf_names(cfg)}


@pytest.mark.parametrize("tp", [1, 2])
def test_shard_merge_split_are_inverse(tp):
    cfg = small_cfg(layers=1)
    sd = _random_hf_state(cfg)
    read = state_dict_reader(sd, cfg)
    for rule in rules(cfg):
        shards = [hf_to_mcore_shard(cfg, rule, read, tp, r) for r in range(tp)]
        full = merge_tp_shards(rule, shards)
        assert all(torch.equal(a, b) for a, b in zip(split_tp(rule, full, tp), shards, strict=True))
        # Full layout == TP=1 shard: merging shards is independent of how they were cut
        # (the vocab padding differs with TP: compare the real rows).
        tp1 = hf_to_mcore_shard(cfg, rule, read, 1, 0)
        rows = cfg.vocab_size if rule.kind == "vocab" else tp1.shape[0]
        assert torch.equal(full[:rows], tp1[:rows])


def test_reader_names_missing_tensor_and_bad_shape(real):
    cfg = QwenConfig.from_hf_dict({**real.hf_config, "num_hidden_layers": 1, "vocab_size": 256})
    sd = _random_hf_state(cfg)
    read = state_dict_reader(sd, cfg)
    with pytest.raises(KeyError, match="missing tensor 'model.layers.5.mlp.up_proj.weight'"):
        read("model.layers.5.mlp.up_proj.weight", (slice(None),))
    sd["model.norm.weight"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(7,\), expected \(1536,\)"):
        read("model.norm.weight", (slice(None),))


def test_transformer_engine_names_round_trip():
    """The GPU (TE spec) layout fuses the norms into the next linear: same mapping, renamed keys."""
    from models.qwen.hf_mapping import hf_to_mcore_state_dict, mcore_shards_to_hf

    cfg = small_cfg(layers=2)
    sd = _random_hf_state(cfg)
    shards = [hf_to_mcore_state_dict(cfg, state_dict_reader(sd, cfg), 2, r, te_names=True) for r in range(2)]
    keys = set(shards[0])
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in keys
    assert not any(k.endswith(("input_layernorm.weight", "pre_mlp_layernorm.weight")) for k in keys)
    back = mcore_shards_to_hf(cfg, shards)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_activation_options_reach_transformer_config(real):
    from models.qwen.config import ActivationOptions

    t = real.transformer_config(tp=2, activations=ActivationOptions(sequence_parallel=True))
    assert t.sequence_parallel and t.recompute_granularity is None
    assert not real.transformer_config(
        tp=1, activations=ActivationOptions(sequence_parallel=True)
    ).sequence_parallel
    t = real.transformer_config(tp=1, activations=ActivationOptions(recompute_granularity="selective"))
    assert t.recompute_granularity == "selective" and t.recompute_modules == ["core_attn"]
    full = ActivationOptions(recompute_granularity="full", recompute_method="block", recompute_num_layers=4)
    t = real.transformer_config(tp=1, activations=full)
    assert (t.recompute_granularity, t.recompute_method, t.recompute_num_layers) == ("full", "block", 4)
    assert real.transformer_config(tp=1).recompute_granularity is None  # default: neither
    with pytest.raises(ValueError, match=r"recompute_num_layers=29 exceeds the model's 28 layers"):
        real.transformer_config(tp=1, activations=ActivationOptions(False, "full", "uniform", 29))


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"recompute_granularity": "partial"}, r"recompute_granularity='partial' is invalid: expected null"),
        ({"recompute_granularity": "full"}, r"'full' needs recompute_method .* and recompute_num_layers"),
        ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 0}, r"recompute_num_layers=0"),
        ({"recompute_method": "uniform"}, r"apply to recompute_granularity='full' only"),
        ({"recompute_granularity": "selective", "recompute_modules": ("attention",)}, r"recompute_modules=\['attention'\]"),
        ({"sequence_parallel": "yes"}, r"sequence_parallel='yes' is invalid: expected true or false"),
    ],
)  # fmt: skip
def test_activation_options_bad_input(kw, msg):
    from models.qwen.config import ActivationOptions

    with pytest.raises(ValueError, match=msg):
        ActivationOptions(**kw)


def test_pad_token_id_is_read_and_written_back(real):
    assert real.pad_token_id is None  # the R1 config has none: no embedding row is frozen
    cfg = QwenConfig.from_hf_dict({**real.hf_config, "pad_token_id": 151643})
    assert cfg.pad_token_id == 151643 and cfg.to_hf_dict()["pad_token_id"] == 151643
