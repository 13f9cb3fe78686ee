"""TranscriptionService: speech to text (Whisper), behind an engine ABC. Importing this package loads no engine."""
