"""`python -m services.transcription --address HOST:PORT`: the transcription service for every transcription model
in the configuration."""

from __future__ import annotations

from services.common.channels import MAX_MESSAGE_BYTES
from services.common.config import ArkConfig, Capability, ConfigError
from services.common.runner import Built, run_service
from services.transcription.engines import create_engine
from services.transcription.servicer import transcription_service
from services.transcription.transcriber import Transcriber

# Room for the request's other fields next to the audio in one gRPC message.
_FRAMING_BYTES = 64 * 1024


async def build(config: ArkConfig, address: str) -> Built:
    if config.limits.max_audio_bytes > MAX_MESSAGE_BYTES - _FRAMING_BYTES:
        raise ConfigError(
            f"limits.max_audio_bytes ({config.limits.max_audio_bytes}) must stay below the gRPC message limit "
            f"({MAX_MESSAGE_BYTES - _FRAMING_BYTES} bytes): uploads travel to this service in one message"
        )
    transcribers = {
        m.id: Transcriber(create_engine(m), config.limits) for m in config.models_for(Capability.TRANSCRIPTION)
    }

    async def close() -> None:
        for transcriber in transcribers.values():
            await transcriber.close()

    admissions = [transcriber.admission for transcriber in transcribers.values()]
    return Built([transcription_service(transcribers)], on_stop=close, admissions=admissions)


if __name__ == "__main__":
    run_service(
        "transcription",
        __doc__,
        build,
        address=lambda config: config.services.transcription.address,
        address_help="services.transcription.address",
    )
