"""A model's own Hugging Face tokenizer, as the embedder needs it: untruncated, unpadded, thread-safe.

Shared by the engines so that text and token-id input are framed the same way whatever runs the model. The Rust
`tokenizers.Tokenizer` is used directly: its `encode_batch` borrows nothing mutably, so the event loop and a
worker thread may tokenize at the same time, which the transformers wrapper does not allow.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer


class ModelTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        # A private copy: truncation or padding stored in tokenizer.json (MiniLM's truncates at 128) would hide an
        # over-long input instead of letting the embedder refuse it.
        self._tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.prefix, self.suffix = self._special_frame()
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str) -> ModelTokenizer:
        return cls(Tokenizer.from_file(path))

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text with the special tokens, nothing truncated.

        One text is encoded in the calling thread: `encode_batch` hands even a single text to the library's worker
        pool and waits for it, and while the model's threads hold the cores that hand-off can stall the event loop
        for milliseconds (it did here, on every request of a concurrent burst).
        """
        if len(texts) == 1:
            return [self._tokenizer.encode(texts[0], add_special_tokens=True).ids]
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    def add_special_tokens(self, ids: Sequence[int]) -> list[int]:
        return [*self.prefix, *ids, *self.suffix]

    def _special_frame(self) -> tuple[list[int], list[int]]:
        """The special tokens put before and after a single text (BERT: [CLS] … [SEP])."""
        probe = "hello"
        content = self._tokenizer.encode(probe, add_special_tokens=False).ids
        framed = self._tokenizer.encode(probe, add_special_tokens=True).ids
        for start in range(len(framed) - len(content) + 1):
            if framed[start : start + len(content)] == content:
                return framed[:start], framed[start + len(content) :]
        raise ValueError("cannot locate a text between the tokenizer's special tokens")
