"""The `xllm` command: `xllm chat --adapter DIR` (terminal chat), `xllm serve --adapter DIR` (HTTP API + page).
Training and evaluation have their own scripts (`xllm-train`, `xllm-evaluate`)."""

from __future__ import annotations

import sys

COMMANDS = {
    "chat": "talk to a trained model in the terminal, replies streamed",
    "serve": "an OpenAI-compatible chat-completions API and a web page (needs the `serve` extra)",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        listed = "\n".join(f"  {name:6} {what}" for name, what in COMMANDS.items())
        print(f"usage: xllm COMMAND [--help]\n\ncommands:\n{listed}", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    # Each command imports only what it needs (the server's web framework is an optional extra).
    if argv[0] == "chat":
        from xllm.apps.chat import main as command
    else:
        from xllm.apps.serve import main as command
    command(argv[1:])


if __name__ == "__main__":
    main()
