"""Turning a stream of token bytes into the text a client may see.

Two concerns, both pure and engine-independent: a token can end in the middle of a UTF-8 character (byte-level
BPE splits emoji and accented letters), and a stop sequence can straddle tokens, so text that might be the start
of a stop sequence is held back until it is known not to be one.
"""

from __future__ import annotations

import codecs


class Utf8Stream:
    """Decodes bytes incrementally, emitting only complete characters."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Cuts generated text at the first stop sequence, holding back only what could still become one."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Feed new text; returns what can be released now. After a match, `stopped` is True and nothing more is
        released."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            released, self._pending = self._pending[:cut], ""
            return released
        hold = self._longest_partial_suffix()
        released = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold :]
        return released

    def flush(self) -> str:
        """End of generation: whatever was held back was not a stop sequence."""
        released, self._pending = self._pending, ""
        return released

    def _longest_partial_suffix(self) -> int:
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:k]):
                    best = k
                    break
        return best
