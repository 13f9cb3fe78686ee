"""Transcribe an audio file (default: the shared jfk.flac) as text, as subtitles, and as a stream."""

import os
import sys
from pathlib import Path

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("ARK_BASE_URL", "http://127.0.0.1:8080/v1"), api_key=os.environ["ARK_API_KEY"])
audio = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared/data/jfk.flac")

with audio.open("rb") as f:
    print(client.audio.transcriptions.create(model="whisper-1", file=f, response_format="text"))
with audio.open("rb") as f:
    print(client.audio.transcriptions.create(model="whisper-1", file=f, response_format="srt"))
with audio.open("rb") as f:
    for event in client.audio.transcriptions.create(model="whisper-1", file=f, stream=True):
        if event.type == "transcript.text.delta":
            print(event.delta, end="", flush=True)
print()
