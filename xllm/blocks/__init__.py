"""Trainable blocks between a frozen encoder and the LLM: Q-Former (and its bridge), C-Former, window Q-Former,
projections into the LLM width, feature positions. They know nothing of modalities or files."""
