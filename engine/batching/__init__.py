"""Batching and logprobs: micro-batch layouts and the per-token logprobs/entropy of completions."""
