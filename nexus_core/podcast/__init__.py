"""Podcast generation: a document → a two-speaker script (teacher) → speech (TTS) → WAV files + timings."""
