"""Request body of /v1/embeddings, fields in OpenAI's order (CreateEmbeddingRequest).

`input` is typed loosely on purpose: it has four shapes (a string, strings, token ids, token-id arrays), and
translate checks them itself so that each mistake gets its own message and `param` (`input[3]`), rather than
pydantic's report of why every shape of the union failed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: Any
    model: Annotated[str, Field(min_length=1)]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: str | None = None
