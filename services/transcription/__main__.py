"""`python -m services.transcription --address HOST:PORT`: the transcription service for every transcription model
in the configuration."""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.common.config import Capability, load_config
from services.common.server import MAX_MESSAGE_BYTES, configure_logging, serve
from services.transcription.engines import create_engine
from services.transcription.servicer import transcription_service
from services.transcription.transcriber import Transcriber

# Room for the request's other fields next to the audio in one gRPC message.
_FRAMING_BYTES = 64 * 1024


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="configuration file (default: $ARK_CONFIG or deploy/ark.yaml)")
    parser.add_argument("--address", help="listen address (default: services.transcription.address)")
    args = parser.parse_args()
    configure_logging()
    config = load_config(args.config)
    if config.limits.max_audio_bytes > MAX_MESSAGE_BYTES - _FRAMING_BYTES:
        sys.exit(
            f"limits.max_audio_bytes ({config.limits.max_audio_bytes}) must stay below the gRPC message limit "
            f"({MAX_MESSAGE_BYTES - _FRAMING_BYTES} bytes): uploads travel to this service in one message"
        )
    address = args.address or config.services.transcription.address
    transcribers = {
        m.id: Transcriber(create_engine(m), config.limits) for m in config.models_for(Capability.TRANSCRIPTION)
    }

    async def close() -> None:
        for transcriber in transcribers.values():
            await transcriber.close()

    await serve([transcription_service(transcribers)], address, on_stop=close, token=config.services.internal_token)


if __name__ == "__main__":
    asyncio.run(main())
