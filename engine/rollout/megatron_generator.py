"""The built-in rollout generator: the training model itself, decoding with continuous batching.

``generate(prompts, n, sampling)`` runs ``len(prompts) * n`` rows through a fixed number of decode
slots (``DecodeConfig.max_batch_rows``; default: all rows at once). Prompts wait in a queue; one is
admitted when ``n`` slots are free: it is prefilled once and its K/V written to its ``n`` slots (the
shared-prompt fan-out). Every step decodes all occupied slots together, whatever their lengths
(``engine.rollout.decode``). Every ``sync_every`` steps the host reads the done flags: finished rows
leave (rows from the end move into their slots, so the batch stays a prefix of the slots) and queued
prompts join. Between those reads nothing waits for the device: finished rows keep decoding
harmlessly until the next read, and a non-finite logit is recorded on the device with its step.
With ``DecodeConfig.cuda_graphs`` each decode step is replayed from a CUDA graph per (rows bucket,
span bucket) (``engine.rollout.step_graphs``); the step then touches only persistent tensors.

All TP ranks run in lock step: sampling reduces per-row statistics over TP
(``engine.rollout.sampling``) so every rank draws the same token, and every host decision depends on
those shared values only.
"""

from __future__ import annotations

from collections import deque

import torch
from megatron.core import parallel_state

from engine.rollout.base import DecodeConfig, GenerationOutput, SamplingConfig
from engine.rollout.decode import DecodeModel
from engine.rollout.sampling import VocabShard, sample_next, vocab_shard
from engine.rollout.step_graphs import StepGraphs, pick_bucket, row_buckets, span_bucket
from engine.seeds import derive_seed
from models.qwen.model import unwrap


class MegatronGenerator:
    """Built-in generator over the (TP-sharded) training model: slot KV cache, continuous batching."""

    def __init__(
        self,
        model: torch.nn.Module,
        vocab_size: int,
        eos_token_ids: list[int],
        pad_token_id: int,
        decode: DecodeConfig | None = None,
    ) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
        self.pad_token_id = pad_token_id
        self.decode = decode or DecodeConfig()
        self.weight_version = 0

    def sync_weights(self, model: torch.nn.Module, version: int) -> None:
        """The built-in generator shares the trainer's parameters: syncing is recording the version."""
        self.model = model
        self.weight_version = version

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig) -> GenerationOutput:
        gpt = unwrap(self.model)
        was_training = gpt.training
        gpt.eval()
        try:
            return _Run(self, DecodeModel(gpt), prompt_ids, n, sampling).run()
        finally:
            gpt.train(was_training)


class _Run:
    """One ``generate`` call: slot state on the device, the queue and the slot count on the host."""

    def __init__(
        self,
        g: MegatronGenerator,
        dm: DecodeModel,
        prompts: list[list[int]],
        n: int,
        sampling: SamplingConfig,
    ) -> None:
        if n < 1:
            raise ValueError(f"generate: n (samples per prompt) must be >= 1, got {n}")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        N = sampling.max_new_tokens
        context = dm.gpt.max_sequence_length
        for i, p in enumerate(prompts):
            if len(p) + N > context:
                raise ValueError(
                    f"generate: prompt {i} has {len(p)} tokens + max_new_tokens {N} = {len(p) + N}, "
                    f"more than the model's context {context}"
                )
        self.g, self.dm, self.prompts, self.n, self.sampling = g, dm, prompts, n, sampling
        cfg = g.decode
        rows = len(prompts) * n
        self.slots = min(rows, cfg.max_batch_rows) if cfg.max_batch_rows else rows
        if self.slots < n:
            raise ValueError(
                f"decode.max_batch_rows={cfg.max_batch_rows} must be >= n={n} (one prompt's rows)"
            )
        dev = self.device = dm.device
        self.sync_every = cfg.sync_every or (16 if dev.type == "cuda" else 1)
        self.max_len = max(len(p) for p in prompts) + N
        self.cache = dm.allocate(self.slots, self.max_len)
        # Same stream on the TP ranks of a DP replica, distinct across replicas; the trainer varies
        # sampling.seed per step so a resumed run draws what an uninterrupted one would.
        self.seed = derive_seed(sampling.seed, parallel_state.get_data_parallel_rank())
        self.shard: VocabShard | None = None
        # Stop tokens as a lookup table: one gather per step (torch.isin may sort, and sync, on GPU).
        self.is_stop = torch.zeros(g.vocab_size, dtype=torch.bool, device=dev)
        self.is_stop[g.eos[(g.eos >= 0) & (g.eos < g.vocab_size)].to(dev)] = True
        long = dict(dtype=torch.long, device=dev)
        # Outputs have one extra row, ``trash``: free slots point at it, so their (discarded) writes
        # never collide with a live row's.
        self.trash = rows
        self.out_tok = torch.full((rows + 1, N), g.pad_token_id, **long)
        self.out_lp = torch.zeros(rows + 1, N, device=dev)
        self.lengths = torch.zeros(rows + 1, **long)
        self.finished = torch.zeros(rows + 1, dtype=torch.bool, device=dev)
        # Per slot: output row, next write position (= cached length), tokens generated, last token.
        # A free slot is done, writes to the trash row, and sits at position 0.
        self.row = torch.full((self.slots,), self.trash, **long)
        self.pos, self.step, self.last = (torch.zeros(self.slots, **long) for _ in range(3))
        self.done = torch.ones(self.slots, dtype=torch.bool, device=dev)
        self.bad_step = torch.full((), -1, **long)
        self.t = torch.zeros((), **long)  # decode steps so far (prefill logits count as the current step)
        self.buckets = row_buckets(self.slots) if cfg.cuda_graphs else None
        self.graphs = StepGraphs(self._step, capture=dev.type == "cuda") if cfg.cuda_graphs else None

    def _record(self, lo: int, hi: int, logits: torch.Tensor) -> None:
        """Sample the next token of slots [lo, hi) from their logits; write outputs of live rows only."""
        if self.shard is None:
            self.shard = vocab_shard(self.g.vocab_size, logits.shape[-1])
        row, step, done = self.row[lo:hi], self.step[lo:hi], self.done[lo:hi]
        d = sample_next(logits, self.sampling, self.seed, row, step, self.shard)
        live = ~done
        bad = (live & ~d.finite).any()
        self.bad_step.copy_(torch.where((self.bad_step < 0) & bad, self.t, self.bad_step))
        tok = d.tokens.clamp(0, self.g.vocab_size - 1)
        col = step.clamp_max(self.sampling.max_new_tokens - 1)
        self.out_tok[row, col] = torch.where(live, tok, self.out_tok[row, col])
        self.out_lp[row, col] = torch.where(live, d.logprobs, self.out_lp[row, col])
        eos = live & self.is_stop[tok]
        self.lengths[row] = torch.where(live, step + 1, self.lengths[row])
        self.finished[row] |= eos
        self.done[lo:hi] = done | eos | (step + 1 >= self.sampling.max_new_tokens)
        self.step[lo:hi] = step + live
        self.last[lo:hi] = torch.where(live, tok, self.last[lo:hi])

    def _admit(self, active: int, queue: deque[int]) -> int:
        """Prefill queued prompts into free slots from ``active`` on; returns the new active count."""
        n, budget = self.n, self.g.decode.max_prefill_tokens
        while queue and active + n <= self.slots:
            take: list[int] = []
            while queue and active + (len(take) + 1) * n <= self.slots:
                longest = max(len(self.prompts[i]) for i in [*take, queue[0]])
                if take and (len(take) + 1) * longest > budget:
                    break
                take.append(queue.popleft())
            S = max(len(self.prompts[i]) for i in take)
            ids = torch.full((len(take), S), self.g.pad_token_id, dtype=torch.long)
            for j, i in enumerate(take):
                ids[j, S - len(self.prompts[i]) :] = torch.tensor(self.prompts[i])
            lens = torch.tensor([len(self.prompts[i]) for i in take], device=self.device)
            lo, hi = active, active + len(take) * n
            slots = torch.arange(lo, hi, device=self.device).view(len(take), n)
            logits = self.dm.prefill(self.cache, ids.to(self.device), lens, slots)
            first = torch.tensor(take, device=self.device)[:, None] * n
            self.row[lo:hi] = (first + torch.arange(n, device=self.device)).reshape(-1)
            self.pos[lo:hi] = lens.repeat_interleave(n)
            self.step[lo:hi] = 0
            self.done[lo:hi] = False
            self._record(lo, hi, logits.repeat_interleave(n, dim=0))
            active = hi
        return active

    def _sync(self, active: int) -> tuple[int, int]:
        """Read the done flags (one host transfer), drop finished rows; returns (active, max position)."""
        flags = torch.cat([self.bad_step[None], self.done[:active].long(), self.pos[:active]]).tolist()
        if flags[0] >= 0:
            raise FloatingPointError(
                f"generator: non-finite logits at decode step {flags[0]} "
                f"(weight version {self.g.weight_version})"
            )
        done, pos = flags[1 : 1 + active], flags[1 + active :]
        alive = [i for i in range(active) if not done[i]]
        new = len(alive)
        holes = [i for i in range(new) if done[i]]
        movers = [i for i in alive if i >= new]  # as many as holes
        if holes:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            self.cache.move(src, dst, max(pos[i] for i in movers))
            for t in (self.row, self.pos, self.step, self.last, self.done):
                t[dst] = t[src]
        if new < active:  # the vacated slots are free again
            self.done[new:active] = True
            self.row[new:active] = self.trash
            self.pos[new:active] = 0
        return new, max((pos[i] for i in alive), default=0)

    def _step(self, rows: int, span: int) -> None:
        """One decode step of slots [0, rows), attention over cache positions < ``span``. Touches only
        tensors that outlive the step and reads nothing back to the host (CUDA-graph safe)."""
        self.t += 1
        logits = self.dm.decode(self.cache, self.last[:rows], self.pos[:rows], span)
        self._record(0, rows, logits)
        self.pos[:rows] += ~self.done[:rows]

    def run(self) -> GenerationOutput:
        queue = deque(range(len(self.prompts)))
        active = 0
        while True:
            active, pos_max = self._sync(active)
            if queue and active + self.n <= self.slots:
                active = self._admit(active, queue)
                active, pos_max = self._sync(active)
            if active == 0:
                if not queue:
                    break
                continue  # every admitted row finished at its first token: admit more
            if self.graphs is None:  # exact shapes: the span grows with the longest row
                for _ in range(self.sync_every):
                    self._step(active, min(pos_max + 1, self.max_len))
                    pos_max = min(pos_max + 1, self.max_len - 1)
            else:  # static shapes until the next sync: padded rows, one span covering the window
                rows = pick_bucket(active, self.buckets)
                span = span_bucket(pos_max, self.sync_every, self.g.decode.span_bucket, self.max_len)
                for _ in range(self.sync_every):
                    self.graphs(rows, span)
        lengths = self.lengths[: self.trash].cpu()
        tokens, logps = self.out_tok[: self.trash].cpu(), self.out_lp[: self.trash].cpu()
        return GenerationOutput(
            [tokens[i, : lengths[i]].tolist() for i in range(len(lengths))],
            [logps[i, : lengths[i]].tolist() for i in range(len(lengths))],
            self.finished[: self.trash].cpu().tolist(),
            self.g.weight_version,
            self._stats(lengths),
        )

    def _stats(self, lengths: torch.Tensor) -> dict[str, float]:
        stats = {"gen_tokens": float(lengths.sum()), "decode_steps": float(self.t)}
        if self.graphs is not None:
            stats["decode_graphs"] = float(len(self.graphs.captured))
            stats["decode_graph_replays"] = float(self.graphs.replays)
        return stats
