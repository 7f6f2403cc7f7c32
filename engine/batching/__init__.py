"""Batching and logprobs: micro-batch layouts (unpacked, shared prefix, packed sequences) and token
budgets (``micro_batches``), the loss normalisation on logical micro-batches (``normalisation``), the
chunked vocab-parallel logprobs/entropy of completions (``logprobs``) and the run's memory plan
(``memory_plan``)."""
