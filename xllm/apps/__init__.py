"""What a person runs: `xllm chat` (terminal), `xllm serve` (OpenAI-compatible HTTP API and a page), the `xllm`
command that dispatches to them."""
