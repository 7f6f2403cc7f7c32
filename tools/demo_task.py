"""The built-in CPU demo task: single-digit addition ("3+4=" -> "7").

A tiny random-init Qwen2 can learn it with GRPO from scratch in minutes on 2 CPU cores.

* :func:`build_demo_tokenizer`: a character-level tokenizer (``tokenizers`` WordLevel over
  single characters), 17 tokens::

      0 <pad>  1 <bos>  2 <eos>  3 <unk>  4..13 '0'..'9'  14 '+'  15 '='  16 ' '

  It mirrors the R1-Distill conventions the engine relies on: the chat template starts
  with BOS (so prompts are tokenised with ``add_special_tokens=False``; the
  post-processor would prepend a second BOS otherwise), it ignores system messages, the
  generation prompt is the problem text itself (``<bos>3+4=``), and an assistant turn
  ends with EOS. pad, bos, eos and unk are distinct.
* :func:`write_demo_dataset`: JSONL rows ``{"id", "problem": "3+4=", "answer": "7"}``
  with ``a + b <= 9`` (55 distinct problems), loadable by :mod:`engine.data`.
* :func:`demo_exact` and :func:`demo_closeness`: the demo's rewards (exact answer, and a dense
  closeness term), named by dotted path in ``configs/demo_cpu.yaml``; their metrics are
  ``reward/demo_exact/mean`` and ``reward/demo_closeness/mean``.
* :func:`make_demo_assets` (re)creates the committed ``assets/demo/`` files
  (``python -m tools.demo_task [out_dir]``).
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "DEMO_ASSETS_DIR",
    "DEMO_CHAT_TEMPLATE",
    "DEMO_MAX_CONTEXT",
    "DEMO_SPECIAL_TOKENS",
    "DEMO_VOCAB",
    "build_demo_tokenizer",
    "demo_problems",
    "demo_closeness",
    "demo_exact",
    "make_demo_assets",
    "write_demo_dataset",
]

DEMO_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
DEMO_VOCAB: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>", *"0123456789", "+", "=", " ")
DEMO_MAX_CONTEXT = 64  # ample for "<bos>a+b=" (5 tokens) plus a short completion

DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)

DEMO_ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"
DEMO_TRAIN_ROWS = 2048
DEMO_TRAIN_SEED = 0


def build_demo_tokenizer(out_dir: str | os.PathLike[str] | None = None) -> Any:
    """Build the character-level demo tokenizer; ``save_pretrained(out_dir)`` if given.

    ``AutoTokenizer.from_pretrained(out_dir)`` (or :func:`engine.data.load_tokenizer`)
    loads it back.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(DEMO_VOCAB)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per char
    tk.decoder = decoders.Fuse()  # concatenate, no separators
    tk.add_special_tokens(["<pad>", "<bos>", "<eos>", "<unk>"])
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        chat_template=DEMO_CHAT_TEMPLATE,
        model_max_length=DEMO_MAX_CONTEXT,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        **DEMO_SPECIAL_TOKENS,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out_dir))
    return tok


def demo_problems() -> list[tuple[str, str]]:
    """All 55 (problem, answer) pairs ``("a+b=", str(a+b))`` with ``a + b <= 9``."""
    return [(f"{a}+{b}=", str(a + b)) for a in range(10) for b in range(10) if a + b <= 9]


def write_demo_dataset(path: str | os.PathLike[str], n: int, seed: int) -> Path:
    """Write ``n`` rows drawn uniformly (with replacement, ``random.Random(seed)``) from :func:`demo_problems`."""
    rng = random.Random(seed)
    pairs = demo_problems()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for i in range(n):
            problem, answer = pairs[rng.randrange(len(pairs))]
            fh.write(json.dumps({"id": f"demo-{i}", "problem": problem, "answer": answer}) + "\n")
    return path


def demo_exact(completion: str, answer: str) -> float:
    """1.0 if the completion (special tokens skipped, spaces stripped) is exactly the answer."""
    return 1.0 if completion.strip() == answer else 0.0


def demo_closeness(completion: str, answer: str) -> float:
    """Dense shaping for RL from scratch: ``max(0, 1 - |x - answer| / 10)`` for a numeric completion.

    A random-init policy collapses onto wrong digits under the sparse exact reward alone; this
    term tells it which wrong answers are nearer.
    """
    text = completion.strip()
    if not text.isdigit():
        return 0.0
    return max(0.0, 1.0 - abs(int(text) - int(answer)) / 10.0)


def make_demo_assets(out_dir: str | os.PathLike[str] = DEMO_ASSETS_DIR) -> Path:
    """(Re)create ``tokenizer/``, ``train.jsonl`` (2048 rows, seed 0) and ``test.jsonl`` (the 55 problems)."""
    out = Path(out_dir)
    build_demo_tokenizer(out / "tokenizer")
    write_demo_dataset(out / "train.jsonl", DEMO_TRAIN_ROWS, DEMO_TRAIN_SEED)
    with open(out / "test.jsonl", "w", encoding="utf-8", newline="\n") as fh:
        for i, (problem, answer) in enumerate(demo_problems()):
            fh.write(json.dumps({"id": f"demo-test-{i}", "problem": problem, "answer": answer}) + "\n")
    return out


if __name__ == "__main__":
    print(make_demo_assets(sys.argv[1] if len(sys.argv) > 1 else DEMO_ASSETS_DIR))
