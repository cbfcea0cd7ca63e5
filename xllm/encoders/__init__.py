"""Frozen encoders and media decoding: vision models, Whisper, video frame sampling, audio decoding, and the cache
of frozen features. Nothing here trains."""
