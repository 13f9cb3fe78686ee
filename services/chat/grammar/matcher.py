"""llguidance on a llama.cpp vocabulary: the tokenizer it needs, and one matcher per generated sequence.

The matcher computes, before each sampled token, which tokens keep the output inside the grammar (a bitmask over
the vocabulary, usually in tens of microseconds), and consumes the sampled token after. llguidance computes masks
lazily over a token trie with derivative-based regular expressions: no backtracking, so no pattern can make a mask
step run away, and its parser limits (fuel per step, lexer states, grammar size) bound every step.
"""

from __future__ import annotations

import logging
import warnings

import llama_cpp
import llguidance
import numpy as np
from llama_cpp._utils import suppress_stdout_stderr
from llguidance.llamacpp import lltokenizer_from_vocab

log = logging.getLogger(__name__)


def tokenizer_from_vocab(vocab: llama_cpp.llama_vocab_p) -> llguidance.LLTokenizer:
    """The llguidance tokenizer of a loaded llama.cpp model (about a second: build it once per model)."""
    with warnings.catch_warnings():
        # llguidance reads token attributes through a llama-cpp-python alias that warns once per token.
        warnings.simplefilter("ignore", DeprecationWarning)
        return lltokenizer_from_vocab(vocab)


def tokenizer_from_gguf(path: str) -> llguidance.LLTokenizer:
    """The llguidance tokenizer of a GGUF file, reading only its vocabulary (no weights, no context)."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with suppress_stdout_stderr(disable=False):  # llama.cpp prints the whole GGUF header while loading
        model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    if not model:
        raise RuntimeError(f"cannot read the vocabulary of {path}")
    return tokenizer_from_vocab(llama_cpp.llama_model_get_vocab(model))


class TokenMatcher:
    """The grammar state of one sequence: masks logits before sampling, consumes each sampled token."""

    def __init__(self, matcher: llguidance.LLMatcher, n_vocab: int) -> None:
        self._matcher = matcher
        self._n_vocab = n_vocab

    def mask_logits(self, logits: np.ndarray) -> None:
        """Set the logit of every token the grammar forbids next to -inf (`logits` is indexed by token id)."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little", count=min(len(bits) * 8, self._n_vocab)).view(bool)
        n = len(allowed)
        np.copyto(logits[:n], -np.inf, where=~allowed)
        if n < len(logits):
            logits[n:] = -np.inf

    def accept(self, token: int) -> bool:
        """Consume the sampled token; False if the grammar did not allow it (the matcher is then in error)."""
        if self._matcher.consume_token(token):
            return True
        log.warning("constraint rejected token %d: %s", token, self._matcher.get_error())
        return False

    def forced(self, limit: int) -> list[int]:
        """The tokens the grammar allows as the only way on from here, at most `limit`, consumed.

        They need no sampling, so the engine evaluates them together in one step instead of one step each
        (jump-forward decoding): a required call's head, `{"name": "lookup_fact", "arguments": {"fact":`, is 14
        tokens of SmolLM2. llguidance leaves out a last token that later text could still merge with, so the
        tokens are the ones sampling would have produced."""
        if limit <= 0:
            return []
        tokens = list(self._matcher.compute_ff_tokens())[:limit]
        if tokens and not self._matcher.consume_tokens(tokens):
            log.warning("constraint rejected its own forced tokens: %s", self._matcher.get_error())
            return []
        return tokens

    @property
    def terminated(self) -> bool:
        """The grammar is complete and admits nothing more: generation ends here."""
        return self._matcher.is_stopped()
