"""How the edge ranks chat workers for a new request (edge/clients/worker_load.py): the workers' own reports, which
count every edge's calls, corrected by this edge's calls since."""

from __future__ import annotations

from edge.clients.worker_load import LoadReport, WorkerLoad


def _loads(**reports: LoadReport | None) -> dict[str, WorkerLoad]:
    loads = {}
    for name, report in reports.items():
        load = loads[name] = WorkerLoad()
        if report is not None:
            load.asking(set())
            load.reported(report)
    return loads


def _soonest(loads: dict[str, WorkerLoad], calls: dict[str, set[object]] | None = None) -> str:
    calls = calls or {}
    return min(loads, key=lambda name: loads[name].rank(calls.get(name, set())))


def test_another_edges_calls_count_through_the_report():
    # This edge has nothing in progress anywhere; another edge keeps a's sequences busy.
    loads = _loads(a=LoadReport(running=16, queued=3, sequences=16), b=LoadReport(running=0, queued=0, sequences=16))
    assert _soonest(loads) == "b"


def test_a_free_sequence_beats_a_queue_and_fewer_running_beat_more():
    loads = _loads(
        full=LoadReport(running=16, queued=0, sequences=16),
        half=LoadReport(running=8, queued=0, sequences=16),
        light=LoadReport(running=2, queued=0, sequences=16),
    )
    assert _soonest(loads) == "light"
    del loads["light"]
    assert _soonest(loads) == "half"


def test_capacity_counts_a_worker_with_more_sequences_takes_more():
    # 6 of 32 taken is a smaller share than 4 of 16 (and both start at once; the larger has the faster step per share).
    loads = _loads(small=LoadReport(4, 0, 16), large=LoadReport(6, 0, 32))
    assert _soonest(loads) == "large"


def test_this_edges_calls_since_the_report_are_added_and_those_ended_since_taken_away():
    load = WorkerLoad()
    before, ended = object(), object()
    load.asking({before, ended})
    load.reported(LoadReport(running=5, queued=0, sequences=16))
    # Two of this edge's calls were counted by the report; one has ended since, and three new ones started.
    new = {object(), object(), object()}
    assert load.requests({before, *new}) == 5 - 1 + 3


def test_a_call_the_worker_took_up_while_the_report_was_on_its_way_is_counted_once():
    load = WorkerLoad()
    load.asking(set())
    quick, queued = object(), object()
    load.admitted(quick)  # its `admitted` event came before the report: the worker counted it
    load.reported(LoadReport(running=1, queued=1, sequences=4))
    # `quick` counts once, not twice; `queued` was not taken up before the report came, so it is added to it.
    assert load.requests({quick, queued}) == 1 + 1 + 1
    # Both ended: what is left is the request the report found queued (another edge's).
    assert load.requests(set()) == 1
    # A call admitted after the report came is a new one since.
    load.admitted(object())
    assert load.requests(set()) == 1


def test_a_burst_between_two_reports_spreads_over_the_workers():
    loads = _loads(a=LoadReport(0, 0, 4), b=LoadReport(0, 0, 4))
    calls: dict[str, set[object]] = {"a": set(), "b": set()}
    for _ in range(8):
        calls[_soonest(loads, calls)].add(object())
    assert len(calls["a"]) == len(calls["b"]) == 4


def test_own_calls_in_progress_are_a_floor_under_a_stale_report():
    load = WorkerLoad()
    load.asking(set())
    load.reported(LoadReport(running=0, queued=0, sequences=4))
    mine = {object(), object()}
    # The report came before these calls were even asked for, yet they are there.
    assert load.requests(mine) == 2


def test_without_a_report_only_this_edges_calls_count_on_one_sequence():
    loads = _loads(a=None, b=None)
    assert loads["a"].rank({object()}) == 2 and loads["b"].rank(set()) == 1
    assert _soonest(loads, {"a": {object()}}) == "b"


def test_a_failed_worker_forgets_its_report():
    load = WorkerLoad()
    load.asking(set())
    load.reported(LoadReport(running=9, queued=4, sequences=16))
    load.forget()
    assert load.requests(set()) == 0 and load.rank(set()) == 1


def test_new_conversations_placed_before_their_calls_start_spread_over_the_workers():
    # A burst of 32 new conversations: every placement is asked for before any of their calls starts.
    loads = _loads(a=LoadReport(0, 0, 16), b=LoadReport(0, 0, 16))
    placed = {"a": 0, "b": 0}
    for _ in range(32):
        name = _soonest(loads)
        loads[name].promise()
        placed[name] += 1
    assert placed == {"a": 16, "b": 16}
    # As their calls start, each takes its promise's place: the count stays what it was.
    calls = {name: {object() for _ in range(16)} for name in loads}
    for name, load in loads.items():
        for _ in range(16):
            load.kept()
        assert load.requests(calls[name]) == 16


def test_a_promise_withdrawn_or_past_its_time_no_longer_counts(monkeypatch):
    load = WorkerLoad()
    load.promise()
    assert load.requests(set()) == 1
    load.withdraw()  # the conversation went to the worker it already had
    assert load.requests(set()) == 0
    monkeypatch.setattr("edge.clients.worker_load.PROMISE_SECONDS", 0.0)
    load.promise()  # placed here, but its call never started here (the registry saw this worker down)
    assert load.requests(set()) == 0
