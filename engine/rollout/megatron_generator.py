"""The built-in rollout generator: the training model itself, decoding with a KV cache.

The built-in generator drives the
training model itself through Megatron-Core's own KV-cache path (a ``StaticInferenceContext``
passed to ``GPTModel.forward``; megatron.core.inference's engines hard-code CUDA, the model path
does not). All TP ranks run in lock step: logits are gathered over TP and the sampled tokens are
broadcast from TP rank 0.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from engine.rollout.base import GenerationOutput, SamplingConfig
from engine.rollout.sampling import sample_next
from engine.seeds import derive_seed
from models.qwen.model import attention_mask, unwrap
from parallel.collectives import broadcast_tp


class MegatronGenerator:
    """Built-in generator over the (TP-sharded) training model, batched with a static KV cache."""

    def __init__(
        self, model: torch.nn.Module, vocab_size: int, eos_token_ids: list[int], pad_token_id: int
    ) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
        self.pad_token_id = pad_token_id
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
            return self._generate(gpt, prompt_ids, n, sampling)
        finally:
            gpt.train(was_training)

    def _generate(
        self, gpt: torch.nn.Module, prompts: list[list[int]], n: int, sampling: SamplingConfig
    ) -> GenerationOutput:
        """Rows are the n samples of each prompt, consecutively. Each prompt is prefilled ONCE (its KV
        cache and last logits then copied to its n rows), as vLLM's prefix caching would."""
        device = next(gpt.parameters()).device
        U, S, N = len(prompts), max(len(p) for p in prompts), sampling.max_new_tokens
        B = U * n
        ids = torch.full((U, S), self.pad_token_id, dtype=torch.long)
        pad = torch.ones(U, S + N, dtype=torch.bool)  # True = attend; prompts are left-padded
        pad[:, :S] = False
        for i, p in enumerate(prompts):
            ids[i, S - len(p) :] = torch.tensor(p)
            pad[i, S - len(p) :] = True
        ids, pad = ids.to(device), pad.to(device)
        # Same stream on the TP ranks of a DP replica, distinct across replicas; the trainer varies
        # sampling.seed per step so a resumed run draws what an uninterrupted one would. Sampling stays
        # on the model's device: on a GPU, host-side sampling over a 152k vocab (torchrun runs one
        # thread per rank) cost ~0.3 s per token and dominated a 1.5B rollout (H200, measured).
        gen = torch.Generator(device=device).manual_seed(
            derive_seed(sampling.seed, parallel_state.get_data_parallel_rank())
        )
        ctx = StaticInferenceContext(B, S + N)
        tokens = torch.full((B, N), self.pad_token_id, dtype=torch.long, device=device)
        logps = torch.zeros(B, N, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        lengths = torch.full((B,), N, dtype=torch.long, device=device)
        eos = self.eos.to(device)
        inp, pos, mask = ids, torch.arange(S, device=device)[None].expand(U, S), attention_mask(pad[:, :S])
        for t in range(N):
            logits = gpt(inp, pos, mask, inference_context=ctx, runtime_gather_output=True)
            ctx.sequence_len_offset += inp.shape[1]
            last = logits[:, -1, : self.vocab_size].float()  # padded vocab never sampled
            if t == 0 and n > 1:  # prefill ran on the U prompts: fan out to their n samples
                last = last.repeat_interleave(n, dim=0)
                pad = pad.repeat_interleave(n, dim=0)
                for k_cache, v_cache in ctx.key_value_memory_dict.values():  # [seq, batch, heads, dim]
                    k_cache[:S, :B] = k_cache[:S, :U].repeat_interleave(n, dim=1)
                    v_cache[:S, :B] = v_cache[:S, :U].repeat_interleave(n, dim=1)
            if not bool(torch.isfinite(last).all()):
                raise FloatingPointError(
                    f"generator: non-finite logits at decode step {t} (weight version {self.weight_version})"
                )
            tok, lp = sample_next(last, sampling, gen)
            tok = broadcast_tp(tok)  # TP ranks see identical logits; this makes lock step certain
            tok = torch.where(done, torch.full_like(tok, self.pad_token_id), tok)
            tokens[:, t], logps[:, t] = tok, torch.where(done, torch.zeros_like(lp), lp)
            hit_eos = ~done & torch.isin(tok, eos)
            lengths = torch.where(hit_eos, torch.full_like(lengths, t + 1), lengths)
            done |= hit_eos
            if bool(done.all()):
                break
            inp = tok[:, None]
            pos = torch.full((B, 1), S + t, device=device)
            mask = ~pad[:, : S + t + 1][:, None, None, :]
        tokens, logps, done, lengths = tokens.cpu(), logps.cpu(), done.cpu(), lengths.cpu()
        finished = done.tolist()
        out_ids = [tokens[i, : lengths[i]].tolist() for i in range(B)]
        out_lp = [logps[i, : lengths[i]].tolist() for i in range(B)]
        return GenerationOutput(
            out_ids, out_lp, finished, self.weight_version, {"gen_tokens": float(lengths.sum())}
        )
