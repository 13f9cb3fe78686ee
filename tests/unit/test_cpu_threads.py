"""`n_threads: auto`: a chat worker's share of the machine's cores (services/common/cpu.py)."""

from __future__ import annotations

import os

import pytest

from services.chat.engines.llama_cpp import llama_settings
from services.common.config import ConfigError, ModelConfig
from services.common.cpu import WORKERS_ON_HOST_ENV, auto_threads

CPUS = len(os.sched_getaffinity(0))


def model(**settings) -> ModelConfig:
    return ModelConfig(id="m", capability="chat", engine="llama_cpp", path="/m.gguf", settings=settings)


def test_auto_divides_the_cores_among_the_workers_on_the_host_and_gives_each_at_least_one():
    assert auto_threads({}) == CPUS  # alone (a container, a pod): every CPU it may run on
    assert auto_threads({WORKERS_ON_HOST_ENV: "2"}) == max(1, CPUS // 2)
    assert auto_threads({WORKERS_ON_HOST_ENV: str(CPUS * 4)}) == 1


def test_auto_is_the_default_and_prompts_use_as_many_threads_as_decoding():
    settings, budget = llama_settings(model(), env={WORKERS_ON_HOST_ENV: "2"})
    assert settings["n_threads"] == settings["n_threads_batch"] == max(1, CPUS // 2)
    assert budget == 600 and "session_kv_budget_mb" not in settings and settings["n_seq"] == 16


def test_numbers_are_kept_as_they_are():
    settings, _ = llama_settings(model(n_threads=3, n_threads_batch="auto"), env={WORKERS_ON_HOST_ENV: "1"})
    assert settings["n_threads"] == 3 and settings["n_threads_batch"] == CPUS


@pytest.mark.parametrize("value", [0, -1, "many", 1.5, True])
def test_anything_but_a_positive_count_or_auto_is_refused_at_start(value):
    with pytest.raises(ConfigError, match=r"models\[m\]\.settings\.n_threads: a positive number of threads or 'auto'"):
        llama_settings(model(n_threads=value))


def test_unknown_settings_are_refused_at_start():
    with pytest.raises(ConfigError, match=r"models\[m\]\.settings\.n_thread: Extra inputs are not permitted"):
        llama_settings(model(n_thread=2))
