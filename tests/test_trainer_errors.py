"""Bad input and failure handling of the GRPO trainer (single process, TP=1, in this process)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO

from engine.config import load_config
from engine.train_config import TrainConfig
from engine.trainer import GRPOTrainer, TrainingError
from models.qwen.model import unwrap

pytestmark = pytest.mark.e2e

TINY = json.loads((REPO / "configs/models/tiny-demo.json").read_text())


def make_cfg(tmp_path: Path, *overrides: str, model: dict | None = None) -> TrainConfig:
    mc = tmp_path / "model.json"
    mc.write_text(json.dumps({**TINY, "hidden_size": 64, "intermediate_size": 64, **(model or {})}))
    base = [
        "parallel.tensor_parallel=1",
        f"model.config={mc}",
        f"logging.dir={tmp_path / 'run'}",
        "logging.log_completions=0",
        "rollout.prompts_per_step=4",
        "rollout.num_generations=4",
        "batching.micro_batch_size=8",
        "max_steps=3",
    ]
    return load_config(TrainConfig, REPO / "configs/demo_cpu.yaml", [*base, *overrides])


def test_tokenizer_ids_beyond_model_vocab(tmp_path):
    with pytest.raises(
        ValueError, match=r"tokenizer assets/demo/tokenizer has 17 tokens but the model vocab .* is 16"
    ):
        GRPOTrainer(make_cfg(tmp_path, model={"vocab_size": 16}))


def test_prompt_plus_completion_longer_than_context(tmp_path):
    with pytest.raises(ValueError, match=r"exceeds the model's max context length 8"):
        GRPOTrainer(make_cfg(tmp_path, model={"max_position_embeddings": 8}))


def test_dataset_missing_column(tmp_path):
    with pytest.raises(ValueError, match=r"nope"):
        GRPOTrainer(make_cfg(tmp_path, "data.answer_column=nope"))


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty"):
        GRPOTrainer(make_cfg(tmp_path, f"data.path={empty}"))


def test_all_equal_rewards_give_zero_advantage_not_nan(tmp_path):
    # `format` looks for "\n</think>\n": never in a digit completion, so every group is all-zero.
    trainer = GRPOTrainer(make_cfg(tmp_path, "rewards.funcs=[format]", "rewards.weights=[1.0]"))
    before = {n: p.detach().clone() for n, p in unwrap(trainer.model).named_parameters()}
    m = trainer.train_step()
    trainer.close()
    assert all(math.isfinite(v) for v in m.values()), m
    assert m["reward/mean"] == 0.0 and m["advantages/abs_mean"] == 0.0
    assert m["loss/pg_loss"] == 0.0 and m["optim/grad_norm"] == 0.0
    after = dict(unwrap(trainer.model).named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # AdamW with zero grads, wd 0


def test_nan_loss_stops_with_a_clear_message(tmp_path, monkeypatch):
    import engine.trainer as tr

    trainer = GRPOTrainer(make_cfg(tmp_path))
    trainer.train_step()  # a good step first, checkpointed
    good = trainer.checkpointer.save(trainer)
    real = tr.completion_logprobs

    def nan_logprobs(*a, **k):
        lp, logits = real(*a, **k)
        return lp * float("nan"), logits

    monkeypatch.setattr(tr, "completion_logprobs", nan_logprobs)
    with pytest.raises(
        TrainingError, match=r"step 1: non-finite loss in micro-batch 0 .*stopping without saving"
    ):
        trainer.train()  # the loop saves only after a good step
    assert trainer.checkpointer.latest() == good
    assert sorted(p.name for p in good.parent.iterdir()) == ["latest", "step_000001"]


def test_nan_weights_stop_generation_with_a_clear_message(tmp_path):
    trainer = GRPOTrainer(make_cfg(tmp_path))
    with torch.no_grad():
        unwrap(trainer.model).decoder.final_layernorm.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"generator: non-finite logits at decode step 0"):
        trainer.train_step()
    trainer.close()


def test_periodic_evaluation_from_the_training_loop(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(
        tmp_path, "max_steps=2", "eval.at_start=false", "eval.every_steps=2", "eval.tasks=[]",
        f"eval.task_files=[{REPO / 'assets/demo/test.jsonl'}]", "eval.limit=8", "eval.k=2",
        "eval.max_new_tokens=2", "eval.temperature=1.0", "eval.top_p=1.0", f"eval.out_dir={tmp_path / 'eval'}",
        model={"max_position_embeddings": 512},  # the eval prompt (MATH_QUERY_TEMPLATE) is ~335 tokens
    )  # fmt: skip
    GRPOTrainer(cfg).train()
    ea = EventAccumulator(str(tmp_path / "run" / "tb"))
    ea.Reload()
    tags = [t for t in ea.Tags()["scalars"] if t.startswith("eval/")]
    assert any(t.endswith("pass@1") for t in tags) and "eval/test/avg@k" in tags, tags
    assert [e.step for e in ea.Scalars(next(t for t in tags if t.endswith("pass@1")))] == [2]
    assert (tmp_path / "eval" / "step_000002").is_dir()


def test_starts_from_an_hf_checkpoint(tmp_path):
    """model.hf_checkpoint: the policy (and the KL reference) start from the HF safetensors weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from models.qwen.model import gather_hf_state_dict

    hf_dir = tmp_path / "hf"
    hcfg = Qwen2Config(**{**TINY, "hidden_size": 64, "intermediate_size": 64})
    torch.manual_seed(3)
    hf = Qwen2ForCausalLM(hcfg).float()
    hf.save_pretrained(hf_dir, safe_serialization=True)
    trainer = GRPOTrainer(
        make_cfg(tmp_path, f"model.hf_checkpoint={hf_dir}", f"model.config={hf_dir}", "loss.beta=0.04")
    )
    got = gather_hf_state_dict(trainer.model, trainer.qcfg)
    ref = gather_hf_state_dict(trainer.ref_model, trainer.qcfg)
    want = hf.state_dict()
    assert got.keys() == ref.keys() and all(
        torch.equal(got[k], want[k]) and torch.equal(ref[k], want[k]) for k in got
    )
    trainer.close()


def test_kl_to_the_frozen_reference(tmp_path):
    """beta > 0: KL is exactly 0 while the policy equals the reference, positive once it moved."""
    trainer = GRPOTrainer(make_cfg(tmp_path, "loss.beta=0.04"))
    m1, m2 = trainer.train_step(), trainer.train_step()
    trainer.close()
    assert m1["loss/kl"] == 0.0 and m2["loss/kl"] > 0.0


def test_rollout_decode_config_reaches_the_generator(tmp_path):
    """``rollout.decode.*`` configures the built-in generator; its bucketed (CUDA-graph schedule) decode,
    with fewer slots than rows, trains exactly as the default decode does."""
    decode = [
        "rollout.decode.max_batch_rows=5",
        "rollout.decode.sync_every=2",
        "rollout.decode.cuda_graphs=true",
        "rollout.decode.span_bucket=8",
    ]
    metrics = {}
    for name, overrides in (("default", []), ("bucketed", decode)):
        (tmp_path / name).mkdir()
        trainer = GRPOTrainer(make_cfg(tmp_path / name, *overrides))
        metrics[name] = [trainer.train_step(), trainer.train_step()]
        gen_decode = trainer.generator.decode
        trainer.close()
    assert (gen_decode.max_batch_rows, gen_decode.sync_every, gen_decode.cuda_graphs) == (5, 2, True)
    for a, b in zip(metrics["default"], metrics["bucketed"], strict=True):
        for key in ("loss/loss", "completion/length_mean", "reward/mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
