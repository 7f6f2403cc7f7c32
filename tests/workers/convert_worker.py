"""Checkpoint conversion checks, run as one process (``--tp 1``) or under torchrun x2 (``--tp 2``).

--tp 1: HF -> mcore (written for TP1 and for TP2 by one process) -> HF bit-exact for every tiny
        variant and a bf16 one; logits via ``verify``; HF output through AutoModelForCausalLM; the
        CLI in-process (exit codes, tampered pair); every bad-input error; interrupted writes.
--tp 2: the same round trip with each rank reading only its slices; verify at TP2; the reshard
        chain TP2 -> TP1 -> TP2 (TP1 written by the DP replicas' rank 0); a TP1-layout checkpoint
        loaded into a TP2 model.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from common import TINY_VARIANTS, Results, megatron_from_hf, tiny_hf_model
from safetensors import safe_open
from safetensors.torch import save_file

from models.qwen import checkpoint as ck
from models.qwen.config import QwenConfig
from parallel.distributed import init_distributed
from tools import convert_checkpoint as cli

LOGIT_TOL = 1e-5  # fp32, absolute


def rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def read_hf_dir(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():  # noqa: SIM118
                out[k] = h.get_tensor(k)
    return out


def compare_hf(res: Results, name: str, src: Path, got: Path, cast: torch.dtype | None = None) -> None:
    a, b = read_hf_dir(src), read_hf_dir(got)
    if cast is not None:
        a = {k: v.to(cast) for k, v in a.items()}
    bad = [k for k in a if k in b and not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))]
    res.record(
        name,
        set(a) == set(b) and not bad,
        missing=sorted(set(a) - set(b))[:5],
        extra=sorted(set(b) - set(a))[:5],
        differ=bad[:5],
        n=len(a),
    )


def save_hf(variant: str, d: Path, dtype: torch.dtype = torch.float32, shard: bool = False) -> None:
    """rank 0 writes the tiny HF model (sharded with an index when ``shard``) plus a tokenizer file."""
    if rank0():
        model = tiny_hf_model(variant).to(dtype)
        model.save_pretrained(d, max_shard_size="100KB" if shard else "1GB")
        (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    barrier()


def nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(out.name + ".tmp-*"))


def expect_error(
    res: Results, name: str, fn, exc: type[BaseException], *needles: str, out: Path | None = None
):
    try:
        fn()
    except exc as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        ok = all(n in msg for n in needles) and (out is None or nothing_written(out))
        res.record(name, ok, message=msg[:600], needles=list(needles))
        return
    except Exception as e:  # noqa: BLE001
        res.record(name, False, error=f"wrong exception {type(e).__name__}: {e}"[:600])
        return
    res.record(name, False, error="no exception raised")


def verify_check(res: Results, name: str, hf: Path, ckpt: Path, tol: float = LOGIT_TOL, **kw) -> None:
    r = cli.verify(hf, ckpt, **kw)
    res.record(name, r.ok and r.max_abs_diff <= tol, max_abs=r.max_abs_diff, tol=tol, verify_tol=r.tol)


# ---- single process --------------------------------------------------------------------
def roundtrip_single(res: Results, root: Path, variant: str) -> None:
    init_distributed(1)
    hf = root / variant / "hf"
    save_hf(variant, hf, shard=variant == "gqa_untied_v300")
    for tp in (1, 2):
        mc = root / variant / f"mc_tp{tp}"
        ck.hf_to_mcore_checkpoint(hf, mc, tp=tp)
        meta = ck.read_checkpoint_metadata(mc)
        res.record(
            f"{variant}/single_tp{tp}/metadata", meta["tensor_parallel"] == tp and meta["dtype"] == "fp32"
        )
        back = root / variant / f"hf_back_tp{tp}"
        ck.mcore_to_hf_checkpoint(mc, back)
        compare_hf(res, f"{variant}/single_tp{tp}/roundtrip", hf, back)
        res.record(f"{variant}/single_tp{tp}/assets", (back / "tokenizer_config.json").exists())
    verify_check(res, f"{variant}/single/logits", hf, root / variant / "mc_tp2")

    # The exported dir is a normal HF model: same logits as the source model.
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, TINY_VARIANTS[variant][0], (2, 10), generator=torch.Generator().manual_seed(5))
    src = AutoModelForCausalLM.from_pretrained(hf, attn_implementation="eager").eval()
    got = AutoModelForCausalLM.from_pretrained(
        root / variant / "hf_back_tp2", attn_implementation="eager"
    ).eval()
    cfg = json.loads((root / variant / "hf_back_tp2" / "config.json").read_text())
    gen = json.loads((root / variant / "hf_back_tp2" / "generation_config.json").read_text())
    with torch.no_grad():
        err = (got(input_ids=ids).logits - src(input_ids=ids).logits).abs().max()
    res.record(
        f"{variant}/automodel",
        float(err) <= 1e-6
        and cfg["architectures"] == ["Qwen2ForCausalLM"]
        and "torch_dtype" in cfg
        and "eos_token_id" in gen,
        max_abs=err,
    )


def dtypes_single(res: Results, root: Path) -> None:
    init_distributed(1)
    variant = "gqa_untied_v300"
    hf16 = root / "bf16" / "hf"
    save_hf(variant, hf16, dtype=torch.bfloat16)
    ck.hf_to_mcore_checkpoint(hf16, root / "bf16" / "mc", tp=2)
    res.record("bf16/metadata", ck.read_checkpoint_metadata(root / "bf16" / "mc")["dtype"] == "bf16")
    ck.mcore_to_hf_checkpoint(root / "bf16" / "mc", root / "bf16" / "back")
    compare_hf(res, "bf16/roundtrip", hf16, root / "bf16" / "back")
    # fp32 HF -> --dtype bf16 checkpoint -> HF equals the source cast to bf16.
    hf32 = root / variant / "hf"
    ck.hf_to_mcore_checkpoint(hf32, root / "cast" / "mc", tp=1, dtype="bf16")
    ck.mcore_to_hf_checkpoint(root / "cast" / "mc", root / "cast" / "back")
    compare_hf(res, "cast_to_bf16/roundtrip", hf32, root / "cast" / "back", cast=torch.bfloat16)
    # bf16 compute on a bf16 pair: informs the bf16 tolerance; fp32 compute of bf16 weights is exact math.
    r = cli.verify(hf16, root / "bf16" / "mc", dtype=torch.bfloat16)
    res.record("bf16/verify_bf16_compute", r.ok, max_abs=r.max_abs_diff, tol=r.tol)
    verify_check(res, "bf16/verify_fp32_compute", hf16, root / "bf16" / "mc")


def cli_single(res: Results, root: Path) -> None:
    """The CLI in-process: exit codes 0 / 1 / 2 and the error on stderr."""
    variant = "mha_untied_v257"
    hf, mc = root / variant / "hf", root / variant / "mc_tp1"

    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(list(argv))
        return rc, out.getvalue(), err.getvalue()

    rc, out, _ = run("verify", "--hf", str(hf), "--ckpt", str(mc))
    res.record(
        "cli/verify_good", rc == 0 and json.loads(out.strip().splitlines()[-1])["ok"], rc=rc, out=out[-300:]
    )

    # Tampered HF side: one MLP weight nudged by 1e-2 relative.
    bad = root / "tampered"
    shutil.copytree(hf, bad)
    tensors = read_hf_dir(bad)
    w = tensors["model.layers.1.mlp.down_proj.weight"]
    tensors["model.layers.1.mlp.down_proj.weight"] = w + 1e-2 * w.abs().max() * torch.randn_like(w)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    rc, out, _ = run("verify", "--hf", str(bad), "--ckpt", str(mc))
    res.record(
        "cli/verify_tampered",
        rc == 1 and not json.loads(out.strip().splitlines()[-1])["ok"],
        rc=rc,
        out=out[-300:],
    )

    out_dir = root / "cli_out"
    rc1, _, _ = run("hf-to-mcore", "--hf", str(hf), "--out", str(out_dir), "--tp", "2")
    rc2, _, err = run("hf-to-mcore", "--hf", str(hf), "--out", str(out_dir), "--tp", "2")
    rc3, _, _ = run("hf-to-mcore", "--hf", str(hf), "--out", str(out_dir), "--tp", "1", "--overwrite")
    res.record(
        "cli/exists_refused_then_overwrite",
        (rc1, rc2, rc3) == (0, 2, 0)
        and "--overwrite" in err
        and ck.read_checkpoint_metadata(out_dir)["tensor_parallel"] == 1
        and not list(root.glob("cli_out.*")),
        rcs=[rc1, rc2, rc3],
        err=err[-300:],
    )
    rc, _, err = run("reshard", "--ckpt", str(mc), "--out", str(root / "cli_r"), "--tp", "3")
    res.record("cli/bad_tp_exit2", rc == 2 and "tensor_parallel=3" in err, rc=rc, err=err[-300:])
    init_distributed(1)  # main() tears the process group down


def errors_single(res: Results, root: Path) -> None:
    init_distributed(1)
    variant = "gqa_untied_v300"
    good = root / variant / "hf"  # sharded with an index
    cfg = QwenConfig.from_file(good)
    tensors = read_hf_dir(good)
    cases = root / "bad"

    def hf_dir(name: str, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
        d = cases / name
        d.mkdir(parents=True)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(config or cfg.to_hf_dict()))
        return d

    def convert(src: Path, name: str, tp: int = 2):
        return lambda: ck.hf_to_mcore_checkpoint(src, cases / f"{name}_out", tp=tp)

    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.k_proj.bias"}
    expect_error(res, "errors/missing_tensor", convert(hf_dir("missing", missing), "missing"), ValueError,
                 "missing 1 tensor", "model.layers.1.self_attn.k_proj.bias", out=cases / "missing_out")  # fmt: skip
    extra = dict(tensors, **{"model.layers.0.mlp.extra_proj.weight": torch.zeros(3, 3)})
    expect_error(res, "errors/unexpected_tensor", convert(hf_dir("extra", extra), "extra"), ValueError,
                 "unexpected 1 tensor", "model.layers.0.mlp.extra_proj.weight", out=cases / "extra_out")  # fmt: skip
    shape = dict(tensors, **{"model.layers.0.mlp.up_proj.weight": torch.zeros(95, 64)})
    expect_error(res, "errors/shape_mismatch", convert(hf_dir("shape", shape), "shape"), ValueError,
                 "model.layers.0.mlp.up_proj.weight", "(95, 64)", "(96, 64)", out=cases / "shape_out")  # fmt: skip
    llama = dict(cfg.to_hf_dict(), architectures=["LlamaForCausalLM"], model_type="llama")
    expect_error(res, "errors/wrong_architecture", convert(hf_dir("arch", tensors, llama), "arch"), ValueError,
                 "LlamaForCausalLM", "Qwen2ForCausalLM", out=cases / "arch_out")  # fmt: skip
    expect_error(res, "errors/tp_does_not_fit", convert(good, "tp3", tp=3), ValueError,
                 "tensor_parallel=3", "num_attention_heads=4", out=cases / "tp3_out")  # fmt: skip
    corrupt = cases / "corrupt"
    shutil.copytree(good, corrupt)
    victim = sorted(corrupt.glob("model-*.safetensors"))[1]
    raw = bytearray(victim.read_bytes())
    raw[8:24] = b"{not json at all"
    victim.write_bytes(bytes(raw))
    expect_error(res, "errors/corrupt_header", convert(corrupt, "corrupt"), ck.CheckpointError,
                 victim.name, "corrupted", out=cases / "corrupt_out")  # fmt: skip
    bin_only = cases / "bin_only"
    bin_only.mkdir()
    (bin_only / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    torch.save({}, bin_only / "pytorch_model.bin")
    expect_error(res, "errors/no_safetensors", convert(bin_only, "bin_only"), FileNotFoundError,
                 "pytorch_model.bin", "only safetensors", out=cases / "bin_only_out")  # fmt: skip

    # Existing output: refused (and untouched) without overwrite; a non-checkpoint dir never overwritten.
    mc = root / variant / "mc_tp1"
    before = (mc / ck.METADATA_FILE).read_text()
    expect_error(res, "errors/output_exists", lambda: ck.hf_to_mcore_checkpoint(good, mc, tp=1), FileExistsError,
                 str(mc), "--overwrite")  # fmt: skip
    res.record("errors/output_exists_untouched", (mc / ck.METADATA_FILE).read_text() == before)
    precious = cases / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    expect_error(res, "errors/overwrite_non_checkpoint", lambda: ck.hf_to_mcore_checkpoint(good, precious, tp=1, overwrite=True),
                 ck.CheckpointError, "refusing to overwrite")  # fmt: skip
    res.record("errors/non_checkpoint_untouched", (precious / "notes.txt").read_text() == "keep me")

    # Megatron side: not a checkpoint; a checkpoint of another model.
    expect_error(res, "errors/not_mcore_checkpoint", lambda: ck.mcore_to_hf_checkpoint(good, cases / "x_out"),
                 ck.CheckpointError, ck.METADATA_FILE, out=cases / "x_out")  # fmt: skip
    from models.qwen.model import build_model

    other = QwenConfig.from_file(root / "gqa_tied_v512" / "hf")
    expect_error(res, "errors/checkpoint_model_mismatch",
                 lambda: ck.load_mcore_checkpoint(build_model(other), mc), ck.CheckpointError, "tie_word_embeddings")  # fmt: skip


def interrupted_single(res: Results, root: Path) -> None:
    """A failure mid-write leaves the previous output intact and no temporary dir behind."""
    init_distributed(1)
    variant = "gqa_untied_v300"
    hf, mc = root / variant / "hf", root / variant / "mc_tp1"
    old_meta = (mc / ck.METADATA_FILE).read_text()

    real_save = ck._dist_save

    def save_then_crash(state, path):
        real_save(state, path)  # the tensors are on disk...
        raise RuntimeError("simulated crash before the metadata is written")

    ck._dist_save = save_then_crash
    try:
        expect_error(res, "interrupt/mcore_save", lambda: ck.hf_to_mcore_checkpoint(hf, mc, tp=2, overwrite=True),
                     RuntimeError, "simulated crash")  # fmt: skip
    finally:
        ck._dist_save = real_save
    res.record(
        "interrupt/mcore_previous_intact",
        (mc / ck.METADATA_FILE).read_text() == old_meta and not list(mc.parent.glob("mc_tp1.*")),
    )

    back = root / variant / "hf_back_tp1"
    old_files = {p.name: p.read_bytes() for p in back.iterdir()}
    real_write = ck._StreamingSafetensorsFile.write
    calls = {"n": 0}

    def write_then_crash(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("simulated disk error")
        real_write(self, name, tensor)

    ck._StreamingSafetensorsFile.write = write_then_crash
    try:
        expect_error(res, "interrupt/hf_write", lambda: ck.mcore_to_hf_checkpoint(mc, back, overwrite=True),
                     OSError, "simulated disk error")  # fmt: skip
    finally:
        ck._StreamingSafetensorsFile.write = real_write
    res.record(
        "interrupt/hf_previous_intact",
        {p.name: p.read_bytes() for p in back.iterdir()} == old_files
        and not list(back.parent.glob("hf_back_tp1.*")),
    )


# ---- torchrun x2 -----------------------------------------------------------------------
def roundtrip_tp2(res: Results, root: Path, variant: str) -> None:
    init_distributed(2)
    hf = root / variant / "hf"
    save_hf(variant, hf, shard=variant == "gqa_tied_v512")
    cfg = QwenConfig.from_file(hf)

    # Count the elements this rank reads: about half the model, not all of it.
    read = {"n": 0}
    real_call = ck.SafetensorsReader.__call__

    def counting(self, name, index):
        t = real_call(self, name, index)
        read["n"] += t.numel()
        return t

    ck.SafetensorsReader.__call__ = counting
    try:
        ck.hf_to_mcore_checkpoint(hf, root / variant / "mc2", tp=2)
    finally:
        ck.SafetensorsReader.__call__ = real_call
    res.record(
        f"{variant}/tp2/reads_own_shard", read["n"] == shard_numel(cfg, 2, dist.get_rank()), read=read["n"]
    )
    res.record(
        f"{variant}/tp2/metadata", ck.read_checkpoint_metadata(root / variant / "mc2")["tensor_parallel"] == 2
    )
    stored = {k: tuple(v.global_shape) for k, v in _stored(root / variant / "mc2", cfg).items()}
    res.record(f"{variant}/tp2/global_shapes", stored == ck.expected_global_shapes(cfg), stored=stored)

    ck.mcore_to_hf_checkpoint(root / variant / "mc2", root / variant / "back2")
    if rank0():
        compare_hf(res, f"{variant}/tp2/roundtrip", hf, root / variant / "back2")
    verify_check(res, f"{variant}/tp2/logits", hf, root / variant / "mc2")

    # Reshard TP2 -> TP1 (DP2 replicas: rank 0 writes everything) -> TP2, tensors unchanged.
    init_distributed(1)
    ck.reshard_mcore_checkpoint(root / variant / "mc2", root / variant / "r1", tp=1)
    init_distributed(2)
    ck.reshard_mcore_checkpoint(root / variant / "r1", root / variant / "r2", tp=2)
    ref = dict(ck.iter_mcore_hf_tensors(root / variant / "mc2"))
    same = True
    for d in ("r1", "r2"):
        got = dict(ck.iter_mcore_hf_tensors(root / variant / d))
        same &= set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    tps = [ck.read_checkpoint_metadata(root / variant / d)["tensor_parallel"] for d in ("r1", "r2")]
    res.record(f"{variant}/tp2/reshard_chain", same and tps == [1, 2], tps=tps)
    # A checkpoint whose files were written with the TP1 layout, loaded into a TP2 model.
    verify_check(res, f"{variant}/tp2/logits_from_tp1_layout", hf, root / variant / "r1")


def model_save_load_tp2(res: Results, root: Path, variant: str) -> None:
    """The trainer's API: save a live TP2 model (random padding rows), reload it into another."""
    from models.qwen.model import build_model

    init_distributed(2)
    hf_model = tiny_hf_model(variant)
    cfg = QwenConfig.from_hf_dict(hf_model.config.to_dict())
    model = megatron_from_hf(hf_model, cfg)  # vocab padding rows keep their random init
    with torch.no_grad():
        emb = model.embedding.word_embeddings.weight
        emb[max(0, cfg.vocab_size - dist.get_rank() * emb.shape[0]) :] = 7.0  # junk in the padding
    out = root / variant / "model_ckpt"
    ck.save_mcore_checkpoint(model, cfg, out, extra={"step": 7}, hf_assets_from=root / variant / "hf")
    meta = ck.read_checkpoint_metadata(out)
    ref = dict(ck.iter_mcore_hf_tensors(root / variant / "mc2"))
    got = dict(ck.iter_mcore_hf_tensors(out))
    res.record(
        f"{variant}/tp2/model_save_matches_converter",
        meta["extra"] == {"step": 7}
        and meta["tensor_parallel"] == 2
        and all(torch.equal(got[k], ref[k]) for k in ref),
    )
    ck.save_mcore_checkpoint(model, cfg, root / variant / "model_ckpt_bf16", dtype="bf16")
    got16 = dict(ck.iter_mcore_hf_tensors(root / variant / "model_ckpt_bf16"))
    res.record(
        f"{variant}/tp2/model_save_bf16",
        all(got16[k].dtype == torch.bfloat16 and torch.equal(got16[k], ref[k].bfloat16()) for k in ref),
    )
    fresh = build_model(cfg)
    ck.load_mcore_checkpoint(fresh, out)
    a, b = dict(model.named_parameters()), dict(fresh.named_parameters())
    femb = fresh.embedding.word_embeddings.weight
    real = max(0, min(femb.shape[0], cfg.vocab_size - dist.get_rank() * femb.shape[0]))
    same = all(torch.equal(a[k], b[k]) for k in a if "word_embeddings" not in k and "output_layer" not in k)
    res.record(
        f"{variant}/tp2/model_load_exact_padding_zero",
        same and torch.equal(femb[:real], emb[:real]) and not femb[real:].any(),
    )


def shard_numel(cfg: QwenConfig, tp: int, rank: int) -> int:
    """Elements one TP rank needs from the HF files: its slice of each tensor (real vocab rows)."""
    from models.qwen.hf_mapping import hf_shape, rules

    n = 0
    for rule in rules(cfg):
        for name in rule.hf:
            shape = hf_shape(cfg, name)
            if rule.kind == "replicated":  # read once, by the rank that stores it
                n += math.prod(shape) if rank == 0 else 0
            elif rule.kind == "vocab":
                rows = cfg.padded_vocab_size(tp) // tp
                n += max(0, min(rows, cfg.vocab_size - rank * rows)) * shape[1]
            else:
                n += math.prod(shape) // tp
    return n


def _stored(ckpt: Path, cfg: QwenConfig):
    return ck._stored_tensors(ckpt, cfg)


def main() -> None:
    res = Results()
    tp = int(res.extra[res.extra.index("--tp") + 1]) if "--tp" in res.extra else 1
    root = res.out / "work"
    torch.set_num_threads(1)
    if tp == 1:
        for variant in TINY_VARIANTS:
            res.run(f"{variant}/single", roundtrip_single, res, root, variant)
        res.run("bf16", dtypes_single, res, root)
        res.run("cli", cli_single, res, root)
        res.run("errors", errors_single, res, root)
        res.run("interrupt", interrupted_single, res, root)
    else:
        for variant in TINY_VARIANTS:
            res.run(f"{variant}/tp2", roundtrip_tp2, res, root, variant)
        for variant in ("gqa_untied_v300", "gqa_tied_v512"):
            res.run(f"{variant}/tp2/model_save", model_save_load_tp2, res, root, variant)
    res.finish()


if __name__ == "__main__":
    main()
