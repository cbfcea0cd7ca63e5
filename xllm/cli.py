"""The `xllm` command: `xllm chat --adapter DIR` (terminal chat). Training and evaluation have their own
scripts (`xllm-train`, `xllm-evaluate`)."""

from __future__ import annotations

import sys

COMMANDS = {"chat": "talk to a trained model in the terminal, replies streamed"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        listed = "\n".join(f"  {name:6} {what}" for name, what in COMMANDS.items())
        print(f"usage: xllm COMMAND [--help]\n\ncommands:\n{listed}", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    from xllm.chat import main as chat  # the one command so far; each imports only what it needs

    chat(argv[1:])


if __name__ == "__main__":
    main()
