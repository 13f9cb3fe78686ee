"""`auto` threads, workers and sequences: the chat engine's defaults derived from the cores (services/common/cpu.py)."""

from __future__ import annotations

import os

import pytest

from services.chat.engines.llama_cpp import llama_settings
from services.common import cpu
from services.common.config import Capability, ConfigError, ModelConfig, load_config
from services.common.cpu import WORKERS_ON_HOST_ENV, auto_sequences, auto_threads, auto_workers
from services.launcher.cli import build_stack, pinned_workers

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
    assert budget == 50 and "session_kv_budget_mb" not in settings
    assert settings["n_seq"] == auto_sequences(settings["n_threads"])


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


# -- workers and sequences: `auto` derived from the cores ------------------------------------------------------------


@pytest.mark.parametrize(
    ("cores", "workers"), [(1, 1), (2, 2), (3, 3), (4, 4), (6, 3), (8, 4), (16, 8), (32, 8), (128, 8)]
)
def test_auto_workers_one_per_core_up_to_four_then_one_per_two_at_most_eight(cores, workers):
    assert auto_workers(cores) == workers


@pytest.mark.parametrize(("threads", "sequences"), [(1, 16), (2, 32), (4, 64), (16, 64)])
def test_auto_sequences_are_sixteen_per_decoding_thread_at_most_64(threads, sequences):
    assert auto_sequences(threads) == sequences


def test_two_cores_get_the_measured_default_two_workers_of_one_thread_and_16_sequences(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "cpus", lambda: 2)
    config = load_config(env={})  # deploy/ark.yaml: workers, threads and sequences all `auto`
    assert config.services.chat.workers == ["127.0.0.1:50051", "127.0.0.1:50052"]
    assert config.services.chat.metrics_ports == [9151, 9152]
    chat = config.models_for(Capability.CHAT)[0]
    settings, _ = llama_settings(chat, env={WORKERS_ON_HOST_ENV: str(len(config.services.chat.workers))})
    assert (settings["n_threads"], settings["n_seq"]) == (1, 16)
    # `ark up` starts those two and names them to every child, so the edge calls exactly the workers started.
    children = build_stack(config, None, tmp_path)
    assert [c.address for c in children if c.name.startswith("chat worker")] == config.services.chat.workers
    assert pinned_workers(config) == {
        "ARK__SERVICES__CHAT__WORKERS": "[127.0.0.1:50051,127.0.0.1:50052]",
        "ARK__SERVICES__CHAT__METRICS_PORTS": "[9151,9152]",
    }
    assert load_config(env=pinned_workers(config)).services.chat == config.services.chat


def test_eight_cores_get_four_workers_of_two_threads_and_32_sequences(monkeypatch):
    monkeypatch.setattr(cpu, "cpus", lambda: 8)
    config = load_config(env={})
    assert len(config.services.chat.workers) == 4 and config.services.chat.workers[-1] == "127.0.0.1:50054"
    settings, _ = llama_settings(config.models_for(Capability.CHAT)[0], env={WORKERS_ON_HOST_ENV: "4"})
    assert (settings["n_threads"], settings["n_seq"]) == (2, 32)


def test_explicit_workers_and_sequences_are_kept(monkeypatch):
    monkeypatch.setattr(cpu, "cpus", lambda: 8)
    config = load_config(
        env={"ARK__SERVICES__CHAT__WORKERS": "[10.0.0.1:7000]", "ARK__SERVICES__CHAT__METRICS_PORTS": "[9300]"}
    )
    assert config.services.chat.workers == ["10.0.0.1:7000"] and config.services.chat.metrics_ports == [9300]
    settings, _ = llama_settings(model(n_seq=3, n_threads=2))
    assert settings["n_seq"] == 3


def test_a_bad_sequence_count_is_refused_at_start():
    with pytest.raises(ConfigError, match=r"models\[m\]\.settings\.n_seq"):
        llama_settings(model(n_seq=0))
