"""Compiles grammars in a child process bounded in time and memory.

Compiling a grammar from a client's schema is the one step of a request whose cost the client controls. It runs in
a separate process with an address-space limit and a deadline: a compile that runs away is killed and refused
(400), one that exhausts its memory or crashes kills only the child, never the chat worker, and the chat worker's
event loop only waits on a pipe. The child is started again at once for the next request.

The child compiles exactly what the chat worker will instantiate (same grammar, same vocabulary, same parser
limits) and computes the first token mask, so a grammar it accepts is known to build and run in the worker.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import resource
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")  # never fork a process that runs llama.cpp threads


@dataclass(frozen=True, slots=True)
class ParserLimits:
    """llguidance's limits on one grammar (`limits.structured_output`: max_grammar_states, max_grammar_symbols)."""

    max_lexer_states: int = 50_000
    max_grammar_size: int = 200_000

    def llguidance(self) -> Any:
        import llguidance

        try:  # parser state never goes into messages a client may see
            return llguidance.LLParserLimits(**asdict(self), verbose_errors=False)
        except TypeError:  # llguidance before 0.7.30 (TensorRT-LLM 1.2.1 pins 0.7.29) has no such switch
            return llguidance.LLParserLimits(**asdict(self))


class CompileRefused(Exception):
    """The grammar did not compile within the bounds; the message says why (safe to show to the client)."""


def _vm_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(conn: Connection, gguf_path: str | None, limits: ParserLimits, memory_bytes: int) -> None:
    """The child's loop: receive a grammar, answer with an error message ("" if it compiled)."""
    import llguidance

    from services.chat.grammar.matcher import tokenizer_from_gguf

    tokenizer = tokenizer_from_gguf(gguf_path) if gguf_path else None
    parser_limits = limits.llguidance()
    # Whatever the child has mapped so far (libraries, vocabulary) plus the compile budget.
    resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + memory_bytes, resource.RLIM_INFINITY))
    conn.send("ready")
    while True:
        try:
            grammar = conn.recv()
        except (EOFError, OSError):
            return  # the worker closed the pipe or exited: nothing more to compile
        if tokenizer is None:
            conn.send(llguidance.LLMatcher.validate_grammar(grammar, None, limits=parser_limits))
            continue
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=parser_limits)
        if not matcher.is_error():
            matcher.compute_bitmask()
        conn.send(matcher.get_error() if matcher.is_error() else "")


class CompileWorker:
    """One child process compiling one grammar at a time; killed and restarted when a compile breaks a bound."""

    def __init__(
        self, gguf_path: str | None, limits: ParserLimits, *, timeout_seconds: float, memory_bytes: int
    ) -> None:
        self._gguf_path = gguf_path
        self._limits = limits
        self._timeout = timeout_seconds
        self._memory = memory_bytes
        self._lock = asyncio.Lock()
        self._process: Any = None
        self._conn: Connection | None = None
        self._ready = False

    def start(self) -> None:
        """Start the child now (it reads the vocabulary: about a second) rather than on the first compile."""
        if self._process is None:
            self._start()

    def _start(self) -> None:
        parent, child = _SPAWN.Pipe()
        self._process = _SPAWN.Process(
            target=_child, args=(child, self._gguf_path, self._limits, self._memory), daemon=True, name="ark-grammar"
        )
        self._process.start()
        child.close()
        self._conn = parent
        self._ready = False

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(5)
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None

    async def _receive(self, seconds: float) -> Any:
        """The child's next message; raises TimeoutError, or EOFError if the child died."""
        conn = self._conn
        assert conn is not None
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_reader(conn.fileno(), lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, seconds)
        finally:
            loop.remove_reader(conn.fileno())
        return conn.recv()

    async def compile(self, grammar: str) -> float:
        """Compile `grammar` in the child; returns the seconds it took, raises CompileRefused."""
        async with self._lock:
            if self._process is None:
                self._start()
            try:
                if not self._ready:
                    # Start-up (reading the vocabulary) is not the client's cost: a generous bound of its own.
                    if await self._receive(max(30.0, self._timeout)) != "ready":
                        raise EOFError
                    self._ready = True
                started = time.perf_counter()
                assert self._conn is not None
                self._conn.send(grammar)
                error = await self._receive(self._timeout)
                elapsed = time.perf_counter() - started
            except TimeoutError:
                log.warning("grammar compile exceeded %.2f s; restarting the compile process", self._timeout)
                self._stop()
                self._start()
                raise CompileRefused(f"compiling it took longer than {self._timeout:g} s") from None
            except (EOFError, OSError):
                log.warning("grammar compile process died (exit code %s); restarting it", self._exitcode())
                self._stop()
                self._start()
                raise CompileRefused("compiling it exceeded ARK's memory bound for a grammar") from None
        if error:
            raise CompileRefused(error)
        return elapsed

    def _exitcode(self) -> int | None:
        return None if self._process is None else self._process.exitcode

    def close(self) -> None:
        self._stop()
