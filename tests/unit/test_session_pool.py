from services.chat.session_pool import SessionPool


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def make(n=2):
    clock = Clock()
    resets: list[str] = []
    pool = SessionPool([f"ctx{i}" for i in range(n)], reset=resets.append, clock=clock)
    return pool, clock, resets


def test_resident_session_keeps_its_context():
    pool, _, _ = make()
    a = pool.checkout("a", "k", 60)
    assert pool.checkout("a", "k", 60).context == a.context
    assert pool.resident == 1 and pool.capacity == 2


def test_least_recently_used_is_evicted_and_reset():
    pool, clock, resets = make()
    a = pool.checkout("a", "k", 60)
    clock.now = 1
    pool.checkout("b", "k", 60)
    clock.now = 2
    pool.checkout("a", "k", 60)  # a is now the most recent
    c = pool.checkout("c", "k", 60)
    assert "b" not in pool and "a" in pool
    assert resets == [c.context] and c.context != a.context


def test_another_keys_state_is_never_handed_over():
    pool, _, resets = make()
    a = pool.checkout("s", "owner", 60)
    a.transcript = object()
    b = pool.checkout("s", "intruder", 60)
    assert b.transcript is None and resets


def test_idle_sessions_expire():
    pool, clock, _ = make()
    pool.checkout("a", "k", 10)
    pool.checkout("b", "k", 100)
    clock.now = 50
    assert pool.expire_idle() == ["a"]
    assert pool.drop("b") and not pool.drop("b")
    assert pool.resident == 0
