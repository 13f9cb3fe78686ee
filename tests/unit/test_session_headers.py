"""Session response headers: which worker incarnation served the request, as an opaque id."""

from __future__ import annotations

from edge.sessions.headers import SESSION_HEADER, WORKER_HEADER, session_headers
from edge.sessions.placement import Placement


def placement(worker: str = "10.0.0.5:50051", epoch: int = 1, *, is_new: bool = False) -> Placement:
    return Placement("3f1c…", worker, worker, epoch, "model", "m:abc", is_new)


def headers(p: Placement | None) -> dict[str, str]:
    return session_headers(p, secure=False, max_age=86400)


def test_the_worker_id_is_stable_per_incarnation_and_hides_the_address():
    first, again = headers(placement()), headers(placement(is_new=True))
    assert first[WORKER_HEADER] == again[WORKER_HEADER]
    assert "10.0.0.5" not in first[WORKER_HEADER]
    assert headers(placement(epoch=2))[WORKER_HEADER] != first[WORKER_HEADER]  # the worker restarted
    assert headers(placement("10.0.0.6:50051"))[WORKER_HEADER] != first[WORKER_HEADER]
    assert first[SESSION_HEADER] == "resumed" and again[SESSION_HEADER] == "new"


def test_a_stateless_request_names_no_worker():
    assert headers(None) == {}
