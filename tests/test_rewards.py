"""Tests for engine/rewards/: open-rs reward quirks, the registry and config, the pool, failures."""

from __future__ import annotations

import math
import pickle
import threading
import time
from dataclasses import dataclass, field

import pytest

from engine.config import ConfigError, config_to_dict, load_config, save_config
from engine.rewards import (
    REWARDS,
    CosineParams,
    RewardConfig,
    RewardScorer,
    RewardSpec,
    RewardWorkerPool,
    accuracy_reward,
    cosine_reward,
    cosine_scaled_value,
    exact_match_reward,
    format_reward,
    length_group_rewards,
    length_reward,
    parse_gold,
    register,
    repetition_reward,
    tag_count_reward,
    wrap_gold,
)

# Misbehaving rewards by dotted path (tests/reward_hooks.py); metric names are the function names.
SLEEP, SLEEP_NAME = "reward_hooks:sleep_forever", "sleep_forever"
RAISE, RAISE_NAME = "reward_hooks:raise_error", "raise_error"
EXIT, EXIT_NAME = "reward_hooks:exit_process", "exit_process"


def _pad(answer: str, total_len: int) -> str:
    """A completion of exactly ``total_len`` characters ending with ``answer``."""
    text = "." * (total_len - len(answer)) + answer
    assert len(text) == total_len
    return text


@pytest.fixture(scope="module")
def pool():
    # One pool for the whole module: spawning a worker costs ~0.5-2 s.
    p = RewardWorkerPool(num_workers=2, start_method="spawn")
    yield p
    p.close()


# ---------------------------------------------------------------------------------------
# Table of (function, completion, gold, expected), checked inline and through the pool.
# ---------------------------------------------------------------------------------------

THINK = "<think>\nreasoning\n</think>\n"
TABLE: list[tuple[str, str, str, float]] = [
    # format: count("\n</think>\n") == 1, no regex, <think> not required
    ("format", "reasoning\n</think>\nanswer", "", 1.0),
    ("format", THINK + "\\boxed{27}", "", 1.0),
    ("format", "no tags at all", "", 0.0),
    ("format", "a\n</think>\nb\n</think>\nc", "", 0.0),
    ("format", "a</think>\nb", "", 0.0),  # needs the leading newline
    # tag_count: 0.5 per tag present exactly once
    ("tag_count", THINK, "", 1.0),
    ("tag_count", "x\n</think>\n", "", 0.5),
    ("tag_count", "<think>\nx", "", 0.5),
    ("tag_count", "<think>\n<think>\nx", "", 0.0),
    # accuracy
    ("accuracy", THINK + "The answer is \\boxed{27}.", "27", 1.0),
    ("accuracy", "\\boxed{26}", "27", 0.0),
    ("accuracy", "\\boxed{0.5}", "\\frac{1}{2}", 1.0),  # numeric equivalence
    ("accuracy", "\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("accuracy", "\\boxed{50\\%}", "\\frac{1}{2}", 1.0),  # units/percent normalised
    ("accuracy", "\\boxed{1,000}", "1000", 1.0),
    ("accuracy", "\\boxed{x=3}", "3", 1.0),
    # malformed_operators=False: \frac12 stays a string and never matches
    ("accuracy", "\\boxed{\\frac12}", "0.5", 0.0),
    # try_extract_without_anchor=False: no \boxed / "final answer" -> nothing extracted
    ("accuracy", "The answer is 27", "27", 0.0),
    ("accuracy", "$27$", "27", 0.0),
    # boxed="all": two boxes become the set {27, 28}
    ("accuracy", "\\boxed{27} and \\boxed{28}", "27", 0.0),
    ("accuracy", "", "27", 0.0),
    # unparseable gold -> 1.0 (recipe quirk)
    ("accuracy", "\\boxed{26}", "\\boxed{}", 1.0),
    ("accuracy", "anything", "", 1.0),
    # exact_match (CPU demo task)
    ("exact_match", " 7\n", "7", 1.0),
    ("exact_match", "7.0", "7", 0.0),
    ("exact_match", "x = 7", "7", 0.0),
    # repetition: words a b c a b c -> trigrams abc bca cab abc: 1 - 3/4 = 0.25
    ("repetition", "a b c a b c", "", -0.25),
    ("repetition", "A b C a B c", "", -0.25),  # lower-cased
    ("repetition", "one two three four", "", 0.0),
    ("repetition", "a b", "", 0.0),  # fewer words than ngram_size
    ("repetition", "", "", 0.0),
]


@pytest.mark.parametrize(("name", "completion", "gold", "expected"), TABLE)
def test_reward_table_inline(name: str, completion: str, gold: str, expected: float) -> None:
    assert REWARDS[name].fn(completion, gold) == pytest.approx(expected)


def test_reward_table_through_pool(pool: RewardWorkerPool) -> None:
    # Same table through the scorer (pool for math-verify rewards, inline for the rest).
    for name in sorted({row[0] for row in TABLE}):
        rows = [r for r in TABLE if r[0] == name]
        scorer = RewardScorer(RewardConfig(funcs=[name]), pool=pool)
        res = scorer([r[1] for r in rows], [r[2] for r in rows])
        assert res.per_function[name] == pytest.approx([r[3] for r in rows]), name
        assert res.total == pytest.approx([r[3] for r in rows])
        assert (res.num_timeouts, res.num_errors) == (0, 0)


def test_gold_wrap() -> None:
    # math-verify's gold parse needs an anchor: a bare number is unparseable -> 1.0 for all.
    assert parse_gold("27", gold_wrap=False) == []
    assert parse_gold("$27$", gold_wrap=False)[0] == 27
    assert parse_gold("27")[0] == 27  # wrapped
    assert parse_gold("0.5", gold_wrap=False) == []
    assert len(parse_gold("\\frac{1}{2}", gold_wrap=False)) > 0  # LaTeX command is an anchor
    assert accuracy_reward("\\boxed{26}", "27", gold_wrap=False) == 1.0
    assert accuracy_reward("\\boxed{26}", "27", gold_wrap=True) == 0.0
    assert wrap_gold("27") == "$27$"
    for already in ("$27$", "\\boxed{27}", "\\(27\\)", "\\[27\\]", "", "  "):
        assert wrap_gold(already) == already


def test_math_verify_off_main_thread() -> None:
    # signal.alarm only works in the main thread; the inline path must disable it there.
    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(accuracy_reward("\\boxed{27}", "27")))
    t.start()
    t.join()
    assert out == [1.0]


# ---------------------------------------------------------------------------------------
# cosine
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "correct", "expected"),
    [
        (0, True, 1.0),
        (500, True, 0.75),
        (1000, True, 0.5),
        (2000, True, 1.0),  # unclamped: wraps around
        (1500, True, 0.75),
        (0, False, 0.0),
        (500, False, -0.25),
        (1000, False, -0.5),
        (2000, False, 0.0),
    ],
)
def test_cosine_scaled_value(length: int, correct: bool, expected: float) -> None:
    assert cosine_scaled_value(length, correct, max_len=1000) == pytest.approx(expected)


def test_cosine_formula_matches_recipe() -> None:
    for n in range(0, 3000, 37):
        c = math.cos(math.pi * n / 1000)
        assert cosine_scaled_value(n, True) == pytest.approx(0.5 + 0.25 * (1 + c))
        assert cosine_scaled_value(n, False) == pytest.approx(-0.5 + 0.25 * (1 + c))


def test_cosine_reward_characters() -> None:
    m = 100
    right, wrong = "\\boxed{27}", "\\boxed{26}"
    assert cosine_reward(_pad(right, 50), "27", max_len=m) == pytest.approx(0.75)
    assert cosine_reward(_pad(right, 100), "27", max_len=m) == pytest.approx(0.5)
    assert cosine_reward(_pad(right, 200), "27", max_len=m) == pytest.approx(1.0)
    assert cosine_reward("", "27", max_len=m) == pytest.approx(0.0)  # wrong, length 0
    assert cosine_reward(_pad(wrong, 100), "27", max_len=m) == pytest.approx(-0.5)
    assert cosine_reward(_pad(wrong, 200), "27", max_len=m) == pytest.approx(0.0)
    assert cosine_reward(_pad(wrong, 100), "\\boxed{}", max_len=m) == 1.0  # bad gold
    # num_tokens is ignored for characters
    assert cosine_reward(_pad(right, 100), "27", max_len=m, num_tokens=0) == pytest.approx(0.5)


def test_cosine_reward_tokens_clamped() -> None:
    right = _pad("\\boxed{27}", 30)
    kw = {"max_len": 100, "length_unit": "tokens"}
    assert cosine_reward(right, "27", num_tokens=50, **kw) == pytest.approx(0.75)
    assert cosine_reward(right, "27", num_tokens=200, **kw) == pytest.approx(1.0)
    assert cosine_reward(right, "27", num_tokens=200, clamp=True, **kw) == pytest.approx(0.5)
    assert cosine_reward("\\boxed{2}", "27", num_tokens=900, clamp=True, **kw) == -0.5
    with pytest.raises(ValueError, match="completion_lengths"):
        cosine_reward(right, "27", **kw)


def test_cosine_scorer_tokens(pool: RewardWorkerPool) -> None:
    cfg = RewardConfig(
        funcs=["cosine"], params={"cosine": {"max_len": 100, "length_unit": "tokens", "clamp": True}}
    )
    scorer = RewardScorer(cfg, pool=pool)
    res = scorer(["\\boxed{27}", "\\boxed{27}"], ["27", "27"], completion_lengths=[0, 400])
    assert res.per_function["cosine"] == pytest.approx([1.0, 0.5])
    with pytest.raises(ValueError, match="completion_lengths"):
        scorer(["\\boxed{27}"], ["27"])


def test_exp3_weighted_total_range(pool: RewardWorkerPool) -> None:
    # Exp 3: 1*format + 2*cosine lies in [-1, 3].
    cfg = RewardConfig(funcs=["format", "cosine"], weights=[1.0, 2.0], params={"cosine": {"max_len": 100}})
    scorer = RewardScorer(cfg, pool=pool)
    completions, golds = [], []
    for n in range(25, 425, 25):
        for answer in ("\\boxed{27}", "\\boxed{5}"):
            for fmt in ("x\n</think>\n", ""):
                completions.append(_pad(fmt + answer, n))
                golds.append("27")
    res = scorer(completions, golds)
    assert all(-1.0 <= t <= 3.0 for t in res.total)
    for i, t in enumerate(res.total):
        expect = res.per_function["format"][i] + 2.0 * res.per_function["cosine"][i]
        assert t == pytest.approx(expect)
    # The extremes: formatted + correct at 2*max_len; unformatted + wrong at max_len.
    ends = scorer([_pad("x\n</think>\n\\boxed{27}", 200), _pad("\\boxed{5}", 100)], ["27", "27"])
    assert ends.total == pytest.approx([3.0, -1.0])


# ---------------------------------------------------------------------------------------
# length (Kimi 1.5), group-relative
# ---------------------------------------------------------------------------------------


def test_length_group_hand_computed() -> None:
    # lengths 10,20,30,50 (min 10, max 50): lam = 0.5, 0.25, 0.0, -0.5
    # correctness T,F,T,F -> 0.5, min(0,0.25)=0, 0.0, min(0,-0.5)=-0.5
    assert length_group_rewards([10, 20, 30, 50], [True, False, True, False]) == pytest.approx(
        [0.5, 0.0, 0.0, -0.5]
    )
    assert length_group_rewards([7, 7, 7], [True, False, True]) == [0.0, 0.0, 0.0]


def test_length_reward_scorer_groups(pool: RewardWorkerPool) -> None:
    right, wrong = "\\boxed{27}", "\\boxed{26}"
    group = [_pad(right, 10), _pad(wrong, 20), _pad(right, 30), _pad(wrong, 50)]
    expected = [0.5, 0.0, 0.0, -0.5]
    assert length_reward(group, ["27"] * 4) == pytest.approx(expected)
    # Two groups of 4, scored independently; the 2nd group's gold is unparseable -> all correct.
    scorer = RewardScorer(RewardConfig(funcs=["length"]), pool=pool)
    res = scorer(group + group, ["27"] * 4 + ["\\boxed{}"] * 4, group_size=4)
    assert res.per_function["length"] == pytest.approx(expected + [0.5, 0.25, 0.0, -0.5])
    with pytest.raises(ValueError, match="group_size"):
        scorer(group[:3], ["27"] * 3, group_size=2)


def test_repetition_config() -> None:
    assert repetition_reward("a b a b a b", ngram_size=2, max_penalty=-2.0) == pytest.approx(
        -2.0 * (1 - 2 / 5)
    )
    scorer = RewardScorer(
        RewardConfig(funcs=["repetition"], params={"repetition": {"ngram_size": 2, "max_penalty": -0.5}})
    )
    assert scorer(["a b a b"], [""]).total == pytest.approx([-0.5 * (1 - 2 / 3)])
    with pytest.raises(ValueError):
        RewardConfig(funcs=["repetition"], params={"repetition": {"max_penalty": 0.5}})


def test_direct_functions_signatures() -> None:
    assert format_reward("x\n</think>\ny") == 1.0
    assert tag_count_reward("<think>\nx\n</think>\n") == 1.0
    assert exact_match_reward("7", "7") == 1.0


# ---------------------------------------------------------------------------------------
# Registry / config validation
# ---------------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert set(REWARDS) == {
        "accuracy",
        "format",
        "cosine",
        "tag_count",
        "length",
        "repetition",
        "exact_match",
    }


def test_config_errors() -> None:
    with pytest.raises(ValueError, match=r"'acuracy'.*Did you mean 'accuracy'.*Valid names"):
        RewardConfig(funcs=["acuracy"])
    with pytest.raises(ValueError, match="weights has length 3 but funcs has length 2"):
        RewardConfig(funcs=["format", "cosine"], weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="cannot import"):
        RewardConfig(funcs=["engine.rewards:no_such_function"])
    with pytest.raises(ValueError, match="duplicate"):
        RewardConfig(funcs=["format", "format"])
    with pytest.raises(ValueError, match="length_unit"):
        RewardConfig(funcs=["cosine"], params={"cosine": {"length_unit": "bytes"}})
    with pytest.raises(ValueError, match="start_method"):
        RewardConfig(start_method="fork")
    assert RewardConfig(funcs=["format", SLEEP]).resolved_weights == [1.0, 1.0]


def test_inline_mode_and_mismatched_inputs() -> None:
    cfg = RewardConfig(funcs=["accuracy", "format", RAISE], weights=[2.0, 1.0, 5.0], num_workers=0)
    with RewardScorer(cfg) as scorer:
        res = scorer([THINK + "\\boxed{27}", "\\boxed{1}"], ["27", "27"])
        assert res.total == pytest.approx([3.0, 0.0])
        assert res.per_function[RAISE_NAME] == [0.0, 0.0]
        assert (res.num_timeouts, res.num_errors) == (0, 2)
        with pytest.raises(ValueError, match="golds"):
            scorer(["a"], [])


# ---------------------------------------------------------------------------------------
# Pool: timeout, error, crash, recovery
# ---------------------------------------------------------------------------------------


def test_timeout_error_and_recovery(pool: RewardWorkerPool) -> None:
    cfg = RewardConfig(funcs=["accuracy", SLEEP, RAISE], timeout_s=1.0)
    scorer = RewardScorer(cfg, pool=pool)
    t0 = time.monotonic()
    res = scorer(["\\boxed{27}", "\\boxed{3}"], ["27", "27"])
    assert time.monotonic() - t0 < 8.0
    assert res.per_function["accuracy"] == [1.0, 0.0]
    assert res.per_function[SLEEP_NAME] == [0.0, 0.0]
    assert res.per_function[RAISE_NAME] == [0.0, 0.0]
    assert res.num_timeouts == 2
    assert res.num_errors == 2
    assert res.total == pytest.approx([1.0, 0.0])
    # Hung workers were killed and replaced: the pool still serves.
    ok = RewardScorer(RewardConfig(funcs=["accuracy"]), pool=pool)(["\\boxed{27}"], ["27"])
    assert ok.total == [1.0]
    assert (ok.num_timeouts, ok.num_errors) == (0, 0)


def test_worker_crash_is_counted(pool: RewardWorkerPool) -> None:
    scorer = RewardScorer(RewardConfig(funcs=[EXIT, "format"]), pool=pool)
    res = scorer(["x\n</think>\ny"], [""])
    assert res.per_function[EXIT_NAME] == [0.0]
    assert res.total == [1.0]
    assert (res.num_timeouts, res.num_errors) == (0, 1)
    again = RewardScorer(RewardConfig(funcs=["accuracy"]), pool=pool)(["\\boxed{5}"], ["5"])
    assert again.total == [1.0]


def test_owned_pool_lifecycle() -> None:
    # A scorer that needs math-verify owns a pool; cheap-only configs start none.
    assert RewardScorer(RewardConfig(funcs=["format", "tag_count"]))._pool is None
    with RewardScorer(RewardConfig(funcs=["accuracy"], num_workers=1)) as scorer:
        assert scorer(["\\boxed{2}"], ["2"]).total == [1.0]
        pool = scorer._pool
        assert pool is not None
    assert scorer._pool is None
    with pytest.raises(RuntimeError, match="closed"):
        pool.run([("accuracy", ("\\boxed{2}", "2"), {})], timeout_s=1.0)


# ---------------------------------------------------------------------------------------
# Registry: one registration per reward; params through the config system
# ---------------------------------------------------------------------------------------


@dataclass
class _Cfg:
    rewards: RewardConfig = field(default_factory=RewardConfig)


@pytest.fixture
def plugin():
    """tests/reward_plugin.py registered (import), unregistered afterwards."""
    import reward_plugin

    spec = RewardSpec(
        "scaled_length", reward_plugin.scaled_length, reward_plugin.ScaledLengthParams, pooled=True
    )
    register(spec)  # again, if an earlier test unregistered it (same function: not a conflict)
    yield reward_plugin
    REWARDS.pop("scaled_length", None)


def test_one_registration_adds_a_reward(plugin, pool: RewardWorkerPool, tmp_path) -> None:
    # By dotted path: importing the module registers it; the registered name is the metric name.
    yaml_path = tmp_path / "r.yaml"
    yaml_path.write_text(
        "rewards:\n  funcs: ['reward_plugin:scaled_length', format]\n"
        "  params:\n    scaled_length: {scale: 2.0}\n"
    )
    cfg = load_config(_Cfg, yaml_path, ["rewards.params.scaled_length.offset=1"]).rewards
    assert cfg.params == {"scaled_length": plugin.ScaledLengthParams(scale=2.0, offset=1)}
    res = RewardScorer(cfg, pool=pool)(["abc", "x\n</think>\ny"], ["", ""], completion_lengths=[5, 7])
    assert res.per_function["scaled_length"] == [12.0, 16.0]  # in the spawned worker: 2 * (n + 1)
    assert res.total == [12.0, 17.0]
    # By name once registered; inline (num_workers=0); characters without token counts.
    cfg0 = RewardConfig(funcs=["scaled_length"], params={"scaled_length": {"scale": 0.5}}, num_workers=0)
    assert RewardScorer(cfg0)(["abcd"], [""]).total == [2.0]
    # A second registration under the same name by another function is refused.
    with pytest.raises(ValueError, match="already registered"):
        register(RewardSpec("scaled_length", format_reward))


def test_params_override_and_errors(tmp_path) -> None:
    yaml_path = tmp_path / "r.yaml"
    yaml_path.write_text("rewards:\n  funcs: [format, cosine]\n  params:\n    cosine: {max_len: 3584}\n")
    cfg = load_config(_Cfg, yaml_path).rewards
    assert cfg.params["cosine"] == CosineParams(max_len=3584)
    full = load_config(
        _Cfg, yaml_path, ["rewards.params.cosine.max_len=100", "rewards.params.cosine.clamp=true"]
    )
    cfg = full.rewards
    assert (cfg.params["cosine"].max_len, cfg.params["cosine"].clamp) == (100, True)
    # Defaults are filled in for every reward in funcs that has parameters (what --print-config shows).
    assert config_to_dict(RewardConfig(funcs=["cosine", "format"]))["params"] == {
        "cosine": {
            "max_len": 1000,
            "min_value_wrong": 0.0,
            "max_value_wrong": -0.5,
            "min_value_correct": 0.5,
            "max_value_correct": 1.0,
            "length_unit": "chars",
            "clamp": False,
        }
    }
    saved = save_config(full, tmp_path / "saved.yaml")
    assert load_config(_Cfg, saved) == full
    with pytest.raises(
        ConfigError,
        match=r"'rewards.params.cosine.max_lne'.*reward 'cosine'.*Did you mean 'rewards.params.cosine.max_len'",
    ):
        load_config(_Cfg, yaml_path, ["rewards.params.cosine.max_lne=100"])
    with pytest.raises(ConfigError, match=r"rewards.params.cosine.max_len.*expected int"):
        load_config(_Cfg, yaml_path, ["rewards.params.cosine.max_len=abc"])
    with pytest.raises(ConfigError, match=r"length_unit.*'chars', 'tokens'"):
        load_config(_Cfg, yaml_path, ["rewards.params.cosine.length_unit=bytes"])
    with pytest.raises(ConfigError, match=r"rewards.params has \['cosnie'\]"):
        load_config(_Cfg, yaml_path, ["rewards.params.cosnie.max_len=1"])
    with pytest.raises(ConfigError, match=r"reward 'format' takes no parameters"):
        load_config(_Cfg, yaml_path, ["rewards.params.format.x=1"])
    with pytest.raises(ConfigError, match=r"on_failure"):
        load_config(_Cfg, yaml_path, ["rewards.on_failure=skip"])
    with pytest.raises(ValueError, match="on_failure"):
        RewardConfig(on_failure="skip")  # type: ignore[arg-type]


def test_metric_names_are_reward_names() -> None:
    res = RewardScorer(RewardConfig(funcs=["tools.demo_task:demo_exact", "format"], num_workers=0))(
        ["7"], ["7"]
    )
    assert list(res.per_function) == ["demo_exact", "format"]
    with pytest.raises(ValueError, match="metric names must be unique"):
        RewardConfig(funcs=["tools.demo_task:demo_exact", "reward_hooks:demo_exact"])


def test_unpicklable_pooled_reward_is_a_clear_error() -> None:
    register(RewardSpec("local_lambda", lambda c, g: 1.0, pooled=True))
    try:
        with pytest.raises(ValueError, match="'local_lambda' runs in the worker pool.*picklable"):
            RewardScorer(RewardConfig(funcs=["local_lambda"], num_workers=1))
        assert RewardScorer(RewardConfig(funcs=["local_lambda"], num_workers=0))(["a"], [""]).total == [1.0]
    finally:
        REWARDS.pop("local_lambda")


# ---------------------------------------------------------------------------------------
# Failures: per-completion flags (rewards.on_failure)
# ---------------------------------------------------------------------------------------


def test_failed_flags_inline_and_pool(pool: RewardWorkerPool) -> None:
    fail_x = "reward_hooks:fail_on_x"
    cfg = RewardConfig(funcs=["format", fail_x], num_workers=0, on_failure="exclude")
    res = RewardScorer(cfg)(["a\n</think>\nb", "x", "c"], ["", "", ""])
    assert res.failed == [False, True, False]
    assert res.per_function["fail_on_x"] == [1.0, 0.0, 1.0] and res.total == [2.0, 0.0, 1.0]
    assert (res.num_timeouts, res.num_errors) == (0, 1)
    # Through the pool: a timeout, an error and a crash each mark their completion.
    cfg = RewardConfig(funcs=["format", fail_x], timeout_s=1.0)
    res = RewardScorer(cfg, pool=pool)(["a", "x", "b"], ["", "", ""])
    assert res.failed == [False, True, False]
    res = RewardScorer(RewardConfig(funcs=[SLEEP], timeout_s=0.5), pool=pool)(["a"], [""])
    assert res.failed == [True] and res.num_timeouts == 1
    # RewardResult crosses processes (broadcast_object over TP): it must pickle.
    assert pickle.loads(pickle.dumps(res)) == res


@pytest.mark.parametrize("exp", [1, 2, 3])
def test_open_rs_configs_keep_the_recipe_failure_rule(exp: int) -> None:
    from conftest import REPO

    from engine.config import build_section, load_yaml_with_base

    path = REPO / f"configs/open_rs_exp{exp}.yaml"
    cfg = build_section(RewardConfig, load_yaml_with_base(path)["rewards"], "rewards", str(path))
    assert cfg.on_failure == "zero"  # the recipe: a failed reward scores 0 inside its group
    if exp == 3:
        assert cfg.params == {"cosine": CosineParams(max_len=3584)}  # open-rs values, characters, unclamped
