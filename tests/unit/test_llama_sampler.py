"""The llama.cpp engine's plain sampler (greedy, or a seeded draw at a temperature) on logits of our choosing."""

from __future__ import annotations

import ctypes
from collections import Counter

import numpy as np
import pytest

from services.chat.domain import Sampling
from services.chat.engines.llama_context import _PlainSampler, _sampler

N_VOCAB = 1500  # not a multiple of the sampler's block: the last block is short


class _Logits:
    """Stands in for the llama.cpp context: one row of logits at index 0."""

    def __init__(self, logits: np.ndarray) -> None:
        self.row = np.ascontiguousarray(logits, dtype=np.single)

    def get_logits_ith(self, at: int):
        assert at == 0
        return self.row.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


class _Matcher:
    def mask_logits(self, logits: np.ndarray) -> None:
        logits[:] = -np.inf


def _logits(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 2.0, N_VOCAB)


def test_greedy_takes_the_largest_logit():
    logits = _logits()
    sampler = _PlainSampler(0.0, None, N_VOCAB)
    assert sampler.sample(_Logits(logits), 0) == int(np.argmax(logits))


def test_draws_follow_the_softmax_at_the_temperature():
    logits = _logits()
    logits[1499] = logits.max() + 3.0  # a likely token in the short last block
    temperature = 0.7
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    sampler = _PlainSampler(temperature, 1, N_VOCAB)
    context = _Logits(logits)
    draws = 20_000
    counts = Counter(sampler.sample(context, 0) for _ in range(draws))
    for token in np.argsort(-p)[:5]:
        assert abs(counts[int(token)] / draws - p[token]) < 4 * np.sqrt(p[token] * (1 - p[token]) / draws) + 1e-3
    assert all(0 <= token < N_VOCAB for token in counts)


@pytest.mark.parametrize("seed", [0, 7, -1, -(2**63), 2**63 - 1])
def test_a_seed_gives_the_same_draws_every_time_and_another_seed_others(seed):
    context = _Logits(_logits() * 0.2)  # flat: many tokens likely
    runs = []
    for s in (seed, seed, seed + 1):
        sampler = _PlainSampler(1.0, s, N_VOCAB)
        runs.append([sampler.sample(context, 0) for _ in range(30)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_constraints_biases_penalties_and_truncation_keep_llama_cpps_chain():
    plain = Sampling(temperature=0.8, top_p=1.0)
    assert isinstance(_sampler(plain, N_VOCAB, None), _PlainSampler)
    assert isinstance(_sampler(Sampling(temperature=0.0, top_p=0.5, top_k=3), N_VOCAB, None), _PlainSampler)
    for sampling in (
        Sampling(temperature=0.8, top_p=0.9),
        Sampling(temperature=0.8, top_p=1.0, top_k=40),
        Sampling(temperature=0.8, top_p=1.0, min_p=0.05),
        Sampling(temperature=0.8, top_p=1.0, presence_penalty=0.5),
        Sampling(temperature=0.0, top_p=1.0, frequency_penalty=0.5),
        Sampling(temperature=0.0, top_p=1.0, repetition_penalty=1.2),
        Sampling(temperature=0.0, top_p=1.0, logit_bias={5: 10.0}),
    ):
        chain = _sampler(sampling, N_VOCAB, None)
        assert not isinstance(chain, _PlainSampler), sampling
        chain.close()
    chain = _sampler(plain, N_VOCAB, _Matcher())  # an output constraint's mask is a stage of the chain
    assert not isinstance(chain, _PlainSampler)
    chain.close()
