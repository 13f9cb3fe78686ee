from services.chat.text import StopMatcher, Utf8Stream


def test_utf8_stream_holds_partial_characters():
    data = "é🙂".encode()
    stream = Utf8Stream()
    out = "".join(stream.push(data[i : i + 1]) for i in range(len(data)))
    assert out + stream.flush() == "é🙂"
    assert Utf8Stream().push(data[:1]) == ""


def test_stop_sequence_across_pieces_is_cut_and_never_shown():
    matcher = StopMatcher(["\nUser:"])
    shown = [matcher.push(p) for p in ["Hello", " world\n", "Us", "er:", " more"]]
    assert "".join(shown) == "Hello world"
    assert matcher.stopped


def test_held_back_text_is_released_when_it_is_not_a_stop():
    matcher = StopMatcher(["STOP"])
    assert matcher.push("abc ST") == "abc "
    assert matcher.push("ILL") == "STILL"
    assert matcher.push("S") == ""
    assert matcher.flush() == "S"
    assert not matcher.stopped


def test_earliest_of_several_stops_wins():
    matcher = StopMatcher(["b", "xyz"])
    assert matcher.push("axyzb") == "a"


def test_no_stops_passes_through():
    matcher = StopMatcher([])
    assert matcher.push("any") == "any"
