"""The OpenMP spin setting reaches the environment before torch loads, and never overrides the operator's."""

from __future__ import annotations

import logging
import os
import sys

import pytest

from services.embeddings.engines import configure_openmp


@pytest.fixture
def no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)


def test_the_spin_count_is_exported_before_torch_loads(no_torch):
    configure_openmp(10000)
    assert os.environ["GOMP_SPINCOUNT"] == "10000"


def test_an_operators_own_setting_wins(no_torch, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    configure_openmp(10000)
    assert os.environ["GOMP_SPINCOUNT"] == "300000"


def test_unset_leaves_openmp_its_default(no_torch):
    configure_openmp(None)
    assert "GOMP_SPINCOUNT" not in os.environ


def test_too_late_is_logged_not_silently_ignored(no_torch, monkeypatch: pytest.MonkeyPatch, caplog):
    monkeypatch.setitem(sys.modules, "torch", object())
    with caplog.at_level(logging.WARNING):
        configure_openmp(10000)
    assert "GOMP_SPINCOUNT" not in os.environ
    assert "not applied" in caplog.text
