"""A llama.cpp context with the sampling chain ARK needs.

llama-cpp-python builds its sampler chain inside `generate()`; this subclass rebuilds that chain with a logit-bias
stage first (OpenAI's `logit_bias`), which the library's own chain lacks. Everything else is the library's.
"""

from __future__ import annotations

from typing import Any

import llama_cpp
from llama_cpp import _internals as internals


class ArkLlama(llama_cpp.Llama):
    """`Llama` plus a per-request logit bias (set `logit_bias` before calling `generate`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logit_bias: dict[int, float] = {}

    def _init_sampler(  # the library's signature
        self,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        temp: float = 0.80,
        repeat_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_eta: float = 0.1,
        mirostat_tau: float = 5.0,
        penalize_nl: bool = True,
        logits_processor: Any = None,
        grammar: Any = None,
    ) -> internals.LlamaSampler:
        sampler = internals.LlamaSampler()
        if self.logit_bias:
            sampler.add_logit_bias(self._n_vocab, self.logit_bias)
        sampler.add_penalties(
            n_vocab=self._n_vocab,
            penalty_last_n=self.last_n_tokens_size,
            penalty_repeat=repeat_penalty,
            penalty_freq=frequency_penalty,
            penalty_present=presence_penalty,
        )
        if grammar is not None:
            sampler.add_grammar(self._model, grammar)
        if temp == 0.0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(top_k)
            sampler.add_typical(typical_p, 1)
            sampler.add_top_p(top_p, 1)
            sampler.add_min_p(min_p, 1)
            sampler.add_temp(temp)
            sampler.add_dist(self._seed)
        return sampler
