"""Tests for engine.data (prompts, checks, sampler) and tools.demo_task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import R1_TOKENIZER

from engine.data import (
    OPEN_RS_SYSTEM_PROMPT,
    DataConfig,
    PromptDataset,
    PromptSampler,
    check_context_length,
    load_tokenizer,
    prepare_prompts,
    render_prompt,
)
from tools.demo_task import (
    DEMO_ASSETS_DIR,
    DEMO_MAX_CONTEXT,
    DEMO_VOCAB,
    build_demo_tokenizer,
    demo_problems,
    make_demo_assets,
    write_demo_dataset,
)

BOS, PLUS, EQ = 1, 14, 15


def digit(d: int) -> int:
    return 4 + d


@pytest.fixture(scope="module")
def demo_tok(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("demo_tok")
    build_demo_tokenizer(out)
    return load_tokenizer(out)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fake_dataset(n: int) -> PromptDataset:
    return PromptDataset(
        prompt_ids=[[BOS, i] for i in range(n)],
        problems=[f"p{i}" for i in range(n)],
        answers=[str(i) for i in range(n)],
        source="fake",
    )


# --------------------------------------------------------------------------- demo task


def test_demo_tokenizer(demo_tok, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    build_demo_tokenizer(tmp_path / "t")
    auto = AutoTokenizer.from_pretrained(tmp_path / "t")
    for tok in (demo_tok, auto):
        assert len(tok) == len(DEMO_VOCAB) == 17
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
        assert tok.convert_ids_to_tokens(list(range(17))) == list(DEMO_VOCAB)
        text = render_prompt(tok, "3+4=", system_prompt="ignored")
        assert text == "<bos>3+4="
        assert tok(text, add_special_tokens=False)["input_ids"] == [BOS, digit(3), PLUS, digit(4), EQ]
        assert tok(text)["input_ids"][:2] == [BOS, BOS]  # like R1: special tokens would double BOS
        assert tok.decode([digit(7), 2], skip_special_tokens=True) == "7"
        assert tok.decode([digit(1), 16, digit(2)]) == "1 2"


def test_demo_dataset_and_reward(tmp_path: Path) -> None:
    path = write_demo_dataset(tmp_path / "d.jsonl", 50, seed=1)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 50
    for r in rows:
        a, b = int(r["problem"][0]), int(r["problem"][2])
        assert r["problem"] == f"{a}+{b}=" and r["answer"] == str(a + b) and a + b <= 9
    assert write_demo_dataset(tmp_path / "e.jsonl", 50, seed=1).read_bytes() == path.read_bytes()
    assert write_demo_dataset(tmp_path / "f.jsonl", 50, seed=2).read_bytes() != path.read_bytes()
    assert len(demo_problems()) == 55


def test_committed_demo_assets_are_reproducible(tmp_path: Path) -> None:
    fresh = make_demo_assets(tmp_path / "demo")
    committed = sorted(p.relative_to(DEMO_ASSETS_DIR) for p in DEMO_ASSETS_DIR.rglob("*") if p.is_file())
    assert committed == sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    for rel in committed:
        assert (DEMO_ASSETS_DIR / rel).read_bytes() == (fresh / rel).read_bytes(), rel


def test_committed_demo_assets_load() -> None:
    tok = load_tokenizer(DEMO_ASSETS_DIR / "tokenizer")
    cfg = DataConfig(path=str(DEMO_ASSETS_DIR / "train.jsonl"), max_prompt_length=8)
    ds = prepare_prompts(
        cfg, tok, vocab_size=len(DEMO_VOCAB), max_completion_length=8, max_context=DEMO_MAX_CONTEXT
    )
    assert len(ds) == 2048 and ds.num_truncated == 0
    assert all(len(ids) == 5 and ids[0] == BOS and ids[-1] == EQ for ids in ds.prompt_ids)
    test = prepare_prompts(DataConfig(path=str(DEMO_ASSETS_DIR / "test.jsonl")), tok)
    assert sorted(zip(test.problems, test.answers, strict=True)) == sorted(demo_problems())


# --------------------------------------------------------------------------- prompts


def test_prepare_prompts_template_and_truncation(demo_tok, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [{"problem": "3+4=", "answer": "7"}, {"problem": "1+2+3+1=", "answer": 7}],
    )
    ds = prepare_prompts(DataConfig(path=str(path), max_prompt_length=5), demo_tok, vocab_size=17)
    assert ds.prompt_ids[0] == [BOS, digit(3), PLUS, digit(4), EQ]
    full = [BOS, digit(1), PLUS, digit(2), PLUS, digit(3), PLUS, digit(1), EQ]
    assert ds.prompt_ids[1] == full[-5:]  # left truncation keeps the last N ids
    assert ds.num_truncated == 1
    assert ds.answers == ["7", "7"] and ds.problems == ["3+4=", "1+2+3+1="]

    limited = prepare_prompts(DataConfig(path=str(path), limit=1, tokenizer=str(demo_tok.name_or_path)))
    assert len(limited) == 1


def test_dataset_errors(demo_tok, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1=", "answer": "2"}])
    with pytest.raises(ValueError) as exc:
        prepare_prompts(DataConfig(path=str(path)), demo_tok)
    msg = str(exc.value)
    assert str(path) in msg and "'problem'" in msg and "question" in msg and "answer" in msg

    empty = tmp_path / "empty.jsonl"
    pq = tmp_path / "empty.parquet"
    import datasets

    datasets.Dataset.from_dict({"problem": [], "answer": []}).to_parquet(str(pq))
    empty.write_text("")
    for p in (pq, empty):
        with pytest.raises(ValueError, match=rf"{p.name}.*empty"):
            prepare_prompts(DataConfig(path=str(p)), demo_tok)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        prepare_prompts(DataConfig(path=str(tmp_path / "nope.jsonl")), demo_tok)

    path = write_jsonl(
        tmp_path / "v.jsonl", [{"problem": "1+1=", "answer": "2"}, {"problem": "1 + 1=", "answer": "2"}]
    )
    with pytest.raises(
        ValueError, match=r"v.jsonl: example 1 has token id 16, outside the model's vocab_size 16"
    ):
        prepare_prompts(DataConfig(path=str(path)), demo_tok, vocab_size=16)


def test_save_to_disk_dir(demo_tok, tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"q": ["2+2="], "a": ["4"]}),
            "test": datasets.Dataset.from_dict({"q": ["1+0="], "a": ["1"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    cfg = DataConfig(path=str(tmp_path / "dd"), split="test", problem_column="q", answer_column="a")
    assert prepare_prompts(cfg, demo_tok).problems == ["1+0="]


def test_context_length_check() -> None:
    check_context_length(512, 3584, 4096)
    with pytest.raises(ValueError, match=r"512.*3585.*4097.*4096"):
        check_context_length(512, 3585, 4096)
    with pytest.raises(ValueError, match="exceeds"):
        prepare_prompts(DataConfig(path="unused.jsonl"), None, max_completion_length=100, max_context=64)


def test_r1_tokenizer_renders_open_rs_prompt() -> None:
    from transformers import AutoTokenizer

    tok = load_tokenizer(R1_TOKENIZER)
    problem = "Who are you?"
    text = render_prompt(tok, problem, OPEN_RS_SYSTEM_PROMPT)
    assert (
        text == f"<｜begin▁of▁sentence｜>{OPEN_RS_SYSTEM_PROMPT}<｜User｜>{problem}<｜Assistant｜><think>\n"
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 151646 and ids.count(151646) == 1  # one BOS
    assert ids[-8:] == [151644, 15191, 525, 498, 30, 151645, 151648, 198]
    assert tok.decode(ids[1:-8]) == OPEN_RS_SYSTEM_PROMPT
    # Without a system prompt: the ids DeepSeek-R1 issue #151 reports, minus the double BOS.
    bare = render_prompt(tok, problem)
    assert tok(bare, add_special_tokens=False)["input_ids"] == [
        151646,
        151644,
        15191,
        525,
        498,
        30,
        151645,
        151648,
        198,
    ]
    assert tok(bare)["input_ids"][:3] == [151646, 151646, 151644]
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        151665,
        151646,
        151643,
        151643,
    )
    assert tok.decode([15191, 525, 498, 30, 151648, 198]) == "Who are you?<think>\n"
    # The assets copy names PreTrainedTokenizerFast, so AutoTokenizer keeps the ByteLevel pipeline too.
    auto = AutoTokenizer.from_pretrained(R1_TOKENIZER)
    assert (
        auto(bare, add_special_tokens=False)["input_ids"] == tok(bare, add_special_tokens=False)["input_ids"]
    )


# --------------------------------------------------------------------------- sampler


def batches(sampler: PromptSampler, n: int) -> list:
    return [next(sampler) for _ in range(n)]


def test_sampler_groups_and_determinism() -> None:
    ds = fake_dataset(10)
    s = PromptSampler(ds, prompts_per_step=4, num_generations=3, seed=7)
    b = next(s)
    assert len(b) == 12 and b.num_prompts == 4 and b.group_size == 3
    for g in range(4):
        rows = b.indices[3 * g : 3 * g + 3]
        assert len(set(rows)) == 1
        assert b.prompt_ids[3 * g : 3 * g + 3] == [ds.prompt_ids[rows[0]]] * 3
        assert b.answers[3 * g : 3 * g + 3] == [ds.answers[rows[0]]] * 3
        assert b.problems[3 * g] == ds.problems[rows[0]]
    assert len(set(b.indices)) == 4

    def epoch_rows(seed: int, epoch_steps: int = 2, skip: int = 0) -> list[int]:
        sm = PromptSampler(ds, prompts_per_step=4, num_generations=1, seed=seed)
        out = [i for bb in batches(sm, skip + epoch_steps) for i in bb.indices]
        return out[skip * 4 :]

    assert epoch_rows(7) == epoch_rows(7)
    assert epoch_rows(7) != epoch_rows(8)
    assert epoch_rows(7) != epoch_rows(7, skip=2)  # epoch 1 differs from epoch 0
    assert len(set(epoch_rows(7))) == 8


def test_sampler_drops_incomplete_tail() -> None:
    s = PromptSampler(fake_dataset(10), prompts_per_step=4, num_generations=1)
    assert s.steps_per_epoch == 2
    got = batches(s, 5)
    assert [b.epoch for b in got] == [0, 0, 1, 1, 2]
    assert [b.step for b in got] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="fewer than prompts_per_step"):
        PromptSampler(fake_dataset(3), prompts_per_step=4, num_generations=1)
    with pytest.raises(ValueError, match="divisible by dp_size"):
        PromptSampler(fake_dataset(10), prompts_per_step=3, num_generations=1, dp_size=2)


def test_sampler_dp_sharding() -> None:
    ds = fake_dataset(50)
    ref = batches(PromptSampler(ds, prompts_per_step=12, num_generations=2, seed=3), 6)
    ranks = [batches(PromptSampler(ds, 12, 2, dp_rank=r, dp_size=4, seed=3), 6) for r in range(4)]
    for step in range(6):
        parts = [ranks[r][step].indices for r in range(4)]
        assert sum(parts, []) == ref[step].indices  # contiguous slices, rank order
        sets = [set(p) for p in parts]
        assert all(len(p) == 6 for p in parts)
        assert all(not (sets[i] & sets[j]) for i in range(4) for j in range(i + 1, 4))


def test_sampler_resume_same_and_other_dp_size() -> None:
    ds = fake_dataset(30)
    ref = batches(PromptSampler(ds, 8, 2, seed=5), 9)  # crosses epochs 0 -> 1 -> 2
    s = PromptSampler(ds, 8, 2, seed=5)
    batches(s, 4)
    state = s.state_dict()
    assert state["epoch"] == 1 and state["position"] == 8 and state["step"] == 4

    same = PromptSampler(ds, 8, 2, seed=5)
    same.load_state_dict(state)
    assert [b.indices for b in batches(same, 5)] == [b.indices for b in ref[4:]]

    resumed = [PromptSampler(ds, 8, 2, dp_rank=r, dp_size=2, seed=5) for r in range(2)]
    for r in resumed:
        r.load_state_dict(dict(state))
    for k in range(5):
        got = [resumed[r].__next__() for r in range(2)]
        assert got[0].indices + got[1].indices == ref[4 + k].indices
        assert got[0].step == ref[4 + k].step and got[0].epoch == ref[4 + k].epoch

    with pytest.raises(ValueError, match="30 prompts"):
        PromptSampler(fake_dataset(31), 8, 2, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PromptSampler(ds, 8, 2, seed=6).load_state_dict(state)
