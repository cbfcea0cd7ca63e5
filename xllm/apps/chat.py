"""`xllm chat --adapter DIR`: talk to a trained model in the terminal, replies streamed as they are generated.

Lines are user turns. `/image PATH` (any modality the adapter has: `/audio PATH`, ...) attaches media to the next
turn, `/reset` starts a new conversation, `/quit` (or end of input) leaves. The whole conversation goes through
the model's one inference path (`XLLM.stream`) each turn, with the LLM's KV cache of the previous turns reused
(`ConversationCache`): only the new turn is computed.

`--skills module:function` (repeatable) lets the model call those functions (docs/skills.md): each turn runs
the skills loop, the calls and their results are printed as they were made, then the answer. An adapter whose
config lists `skills` gets them too, found only among installed packages' `xllm.skills` entry points.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TextIO

from xllm.adapters.format import read_config
from xllm.generation import ConversationCache
from xllm.model import XLLM
from xllm.skills import find_skill


class ChatSession:
    """One conversation: its turns, the media they hold, and the media waiting for the next user turn."""

    def __init__(self, model: XLLM, max_new_tokens: int = 128, skills: Sequence[Callable] = (), max_rounds: int = 4,
                 **generate_kwargs) -> None:
        self.model, self.max_new_tokens, self.generate_kwargs = model, max_new_tokens, generate_kwargs
        self.skills, self.max_rounds = list(skills), max_rounds
        self.reset()

    def reset(self) -> None:
        self.turns: list[dict[str, str]] = []
        self.media: dict[str, list[str]] = {}
        self.pending: list[tuple[str, str]] = []
        self.cache = ConversationCache()

    def attach(self, modality: str, path: str) -> None:
        """Media for the next user turn; checked now, so a typo is reported before the question is asked."""
        if modality not in self.model.interfaces:
            raise ValueError(f"this model reads {', '.join(sorted(self.model.interfaces))}, not {modality}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"no such file: {path}")
        self.pending.append((modality, path))

    def ask(self, text: str) -> Iterable[str]:
        """The user's turn (with the pending media in front of it); yields the reply as it is generated."""
        placeholders = "".join(self.model.interfaces[modality].placeholder + "\n" for modality, _ in self.pending)
        turns = [*self.turns, {"from": "user", "value": placeholders + text}]
        media = {m: list(paths) for m, paths in self.media.items()}
        for modality, path in self.pending:
            media.setdefault(modality, []).append(path)
        if self.skills:
            yield from self._ask_with_skills(turns, media)
            return
        pieces = []
        for piece in self.model.stream(turns, media, self.max_new_tokens, conversation_cache=self.cache,
                                       **self.generate_kwargs):
            pieces.append(piece)
            yield piece
        # Only a finished exchange joins the conversation (an error above leaves it as it was).
        self.turns = [*turns, {"from": "assistant", "value": "".join(pieces).strip()}]
        self.media, self.pending = media, []

    def _ask_with_skills(self, turns: list[dict], media: dict[str, list[str]]) -> Iterable[str]:
        """The skills loop over the turn: each call and its result as a line, then the answer."""
        chat = self.model.chat(turns, media, self.max_new_tokens, tools=self.skills, max_rounds=self.max_rounds,
                               **self.generate_kwargs)
        for call in chat.calls:
            arguments = ", ".join(f"{k}={v!r}" for k, v in call.arguments.items())
            yield f"[{call.name}({arguments}) -> {call.result}]\n"
        yield chat.answer
        self.turns, self.media, self.pending = chat.turns, chat.media, []


def run(session: ChatSession, lines: TextIO, out: TextIO) -> None:
    """The read-reply loop over `lines` (stdin, or a script)."""
    commands = ", ".join(f"/{m} PATH" for m in sorted(session.model.interfaces))
    print(f"xllm chat: type a message; {commands} attaches media to it; /reset; /quit", file=out, flush=True)
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            print("(new conversation)", file=out, flush=True)
            continue
        if line.startswith("/"):
            command, _, argument = line[1:].partition(" ")
            try:
                session.attach(command, argument.strip())
                print(f"({command} attached: {argument.strip()})", file=out, flush=True)
            except (ValueError, FileNotFoundError) as err:
                print(f"error: {err}", file=out, flush=True)
            continue
        print("xllm: ", end="", file=out, flush=True)
        try:
            for piece in session.ask(line):
                print(piece, end="", file=out, flush=True)
        except ValueError as err:  # e.g. an undecodable image: say so, keep the conversation
            print(f"\nerror: {err}", file=out, flush=True)
            session.pending = []
            continue
        print(file=out, flush=True)


def load_skills(adapter: str | Path, names: Sequence[str] = ()) -> list[Callable]:
    """The skills a chat may call: `names` the user gave (`module:function` is imported: the user named it), then
    those the adapter's config lists (installed skills only: a file never makes xllm import a module)."""
    skills = [find_skill(name, import_modules=True) for name in names]
    return skills + [find_skill(name) for name in read_config(adapter).get("skills", [])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="xllm chat", description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True, help="adapter directory (written by training)")
    parser.add_argument("--llm", default=None, help="load the LLM from here instead of the adapter's path")
    parser.add_argument("--encoder", action="append", default=[], metavar="MODALITY=PATH",
                        help="replace a frozen encoder's path, e.g. image=/models/vit (repeatable)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, ... (default: the CPU)")
    parser.add_argument("--dtype", default=None, help="dtype of the frozen LLM and encoders (bfloat16 on a GPU)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--skills", nargs="+", action="extend", default=[], metavar="MODULE:FUNCTION",
                        help="functions the model may call: module:function, or an installed skill's name")
    parser.add_argument("--max_rounds", type=int, default=4, help="most replies per turn when skills are given")
    args = parser.parse_args(argv)
    try:
        skills = load_skills(args.adapter, args.skills)
    except (LookupError, ImportError) as err:
        parser.error(str(err))
    encoders = dict(item.split("=", 1) for item in args.encoder)
    model = XLLM.from_pretrained(args.adapter, llm=args.llm, encoders=encoders or None, device=args.device,
                                 dtype=args.dtype)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {}
    run(ChatSession(model, args.max_new_tokens, skills, args.max_rounds, **sampling), sys.stdin, sys.stdout)


if __name__ == "__main__":
    main()
