import uuid

from edge.sessions.cookies import expire_cookie, parse_session_id, set_cookie


def test_only_canonical_uuid4_is_accepted():
    good = str(uuid.uuid4())
    assert parse_session_id(good) == good
    for bad in [None, "", "abc", str(uuid.uuid1()), good.upper(), good + "x", "{" + good[:-2] + "}"]:
        assert parse_session_id(bad) is None


def test_cookie_attributes_follow_the_contract():
    assert (
        set_cookie("s", secure=False, max_age=86400)
        == "ark_session_id=s; Max-Age=86400; Path=/; SameSite=lax; HttpOnly"
    )
    assert set_cookie("s", secure=True, max_age=86400).endswith("; HttpOnly; Secure")


def test_cookie_max_age_follows_the_configured_session_maximum_age():
    assert "; Max-Age=3600;" in set_cookie("s", secure=False, max_age=3600)
    assert "Max-Age=0" in expire_cookie(secure=False)
