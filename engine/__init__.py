"""The GRPO engine. Importing it silences the known, unactionable library warnings (see
``engine.known_warnings``) before any entry point imports Megatron."""

from engine.known_warnings import filter_known_warnings

filter_known_warnings()
