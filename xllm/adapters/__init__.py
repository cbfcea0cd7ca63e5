"""The adapter artifact: its directory format (config + trainable tensors + model card), reading older formats,
and importing Q-Former weights from BLIP-2 / LAVIS / X-LLM checkpoints. `XLLM.from_pretrained` and
`XLLM.save_pretrained` are built on it."""
