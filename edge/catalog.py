"""Which model a request means: configured ids and their aliases, by capability."""

from __future__ import annotations

import time
from dataclasses import dataclass

from services.common.config import ArkConfig, Capability, ModelConfig
from services.common.errors import InvalidRequestError, ModelNotFoundError


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One name a client may use, and the model it serves."""

    name: str
    model: ModelConfig

    @property
    def is_alias(self) -> bool:
        return self.name != self.model.id


class Catalog:
    def __init__(self, config: ArkConfig) -> None:
        # Listing timestamp: OpenAI's `created` is when the model was published; ours is when it was configured.
        self.created = int(time.time())
        self._entries: dict[str, ModelEntry] = {}
        for model in config.models:
            for name in (model.id, *model.aliases):
                self._entries[name] = ModelEntry(name, model)

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def get(self, name: str) -> ModelEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFoundError(name)
        return entry

    def resolve(self, name: str, capability: Capability) -> ModelConfig:
        """The configured model behind `name`, which must serve `capability`."""
        model = self.get(name).model
        if model.capability is not capability:
            raise InvalidRequestError(
                f"The model `{name}` is a {model.capability} model and cannot be used for {capability}.",
                param="model",
                code="model_not_supported",
            )
        return model
