"""The GPU install path is consistent and resolvable, checked on CPU without downloading TensorRT-LLM.

The `gpu` extra must resolve for CPython 3.12 on Linux x86_64 (TensorRT-LLM's only wheels) together with ARK's
own dependencies; the GPU image's base tag, the recorded API and the constraints file must name the same release.
The resolver check asks PyPI for package metadata (uv: 11 s warm, 13 s cold on this machine): an unreachable index fails
with a message saying so, never as a dependency conflict.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONSTRAINTS = ROOT / "deploy" / "gpu" / "constraints.txt"
UV = Path(sys.executable).with_name("uv")
# The GPU image: NVIDIA's release image is Ubuntu 24.04 (glibc 2.39) with CPython 3.12.
TARGET = ["--python-version", "3.12", "--python-platform", "x86_64-manylinux_2_39"]
# uv's words for a failed connection (DNS, TCP, TLS, HTTP 5xx): an outage, not a resolution failure.
_NETWORK = re.compile(r"error sending request|dns error|Failed to fetch|Could not connect|timed out|status code 5\d\d")


def _extra(name: str) -> dict[str, Requirement]:
    return {r.name: r for r in map(Requirement, PYPROJECT["project"]["optional-dependencies"][name])}


def _base() -> dict[str, Requirement]:
    return {r.name: r for r in map(Requirement, PYPROJECT["project"]["dependencies"])}


def _pins(text: str) -> dict[str, str]:
    return dict(line.split("==", 1) for line in text.splitlines() if "==" in line and not line.startswith("#"))


def _trtllm_version() -> str:
    (pin,) = _extra("gpu")["tensorrt-llm"].specifier
    assert pin.operator == "==", "the gpu extra pins one TensorRT-LLM release"
    return pin.version


def _uv_compile(*args: str) -> str:
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "NO_COLOR": "1"}
    command = [str(UV), "pip", "compile", "--config-file", "deploy/gpu/uv.toml", "pyproject.toml", *TARGET, *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    if done.returncode != 0 and _NETWORK.search(done.stderr):
        pytest.fail(f"PyPI could not be reached (an outage, not a dependency conflict):\n{done.stderr[-2000:]}")
    assert done.returncode == 0, f"the gpu extra does not resolve:\n{done.stderr[-4000:]}"
    return done.stdout


def test_the_cpu_extra_is_what_make_installs_and_holds_every_cpu_engine():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^EXTRAS \?= cpu,dev$", makefile, re.MULTILINE)
    cpu, base = _extra("cpu"), _base()
    assert {"llama-cpp-python", "torch", "sentence-transformers", "faster-whisper"} <= set(cpu)
    assert not {"llama-cpp-python", "torch", "sentence-transformers", "faster-whisper", "tensorrt-llm"} & set(base)
    for extra in ("cpu", "gpu"):
        for name, requirement in _extra(extra).items():
            (pin,) = requirement.specifier
            assert pin.operator == "==", f"{extra}: {name} is pinned"
            if name in base:
                assert base[name].specifier.contains(pin.version), f"{extra}: {name}=={pin.version} fits the base range"


def test_the_gpu_image_the_recorded_api_and_the_extra_name_one_release():
    version = _trtllm_version()
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile.gpu").read_text()
    assert f"nvcr.io/nvidia/tensorrt-llm/release:{version}\n" in dockerfile
    assert "--no-deps" in dockerfile and "-c deploy/gpu/constraints.txt" in dockerfile and "make protos" in dockerfile
    gpu_env = (ROOT / "deploy" / "gpu.env").read_text()
    assert f"ARK_BASE_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:{version}\n" in gpu_env
    assert "ARK_DOCKERFILE=deploy/docker/Dockerfile.gpu\n" in gpu_env
    recorded = json.loads((ROOT / "tests" / "support" / "trtllm_api.json").read_text())
    assert recorded["version"] == version


def test_the_constraints_pin_every_dependency_of_ark_within_its_range():
    pins = _pins(CONSTRAINTS.read_text())
    for name, requirement in _base().items():
        assert name in pins, f"{name} is missing from deploy/gpu/constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement}"
    for name, requirement in _extra("gpu").items():
        if name != "tensorrt-llm":
            assert pins[name] == next(iter(requirement.specifier)).version, f"{name}: constraints agree with the extra"
    assert not {"torch", "tensorrt-llm", "tensorrt", "llama-cpp-python"} & set(pins), "NVIDIA's stack is left alone"


@pytest.mark.slow
@pytest.mark.network
def test_the_gpu_extra_resolves_for_cpython_312_with_the_constraints():
    resolved = _pins(_uv_compile("--extra", "gpu", "-c", str(CONSTRAINTS), "--no-header", "--no-annotate"))
    assert resolved["tensorrt-llm"] == _trtllm_version()
    # TensorRT-LLM's own requirements won where they are strict: the conflicts the CPU pins would cause are gone.
    assert resolved["numpy"].startswith("1.") and resolved["fastapi"] == "0.121.3"
    assert "llama-cpp-python" not in resolved, "a GPU install never builds llama.cpp"
    constraints = _pins(CONSTRAINTS.read_text())
    assert {name: resolved[name] for name in constraints if name in resolved} == {
        name: version for name, version in constraints.items() if name in resolved
    }, "the constraints are the versions the gpu extra resolves to"
