"""`xllm serve --adapter DIR`: the OpenAI chat-completions protocol over a trained model, and a small web page.

`POST /v1/chat/completions` takes OpenAI's `messages` with content parts: `text`, and whatever part types the
adapter's interfaces declare (`ModalityInterface.content_parts`: `image_url` and `video_url` as a `data:` URL or a
path inside a folder the server may read, `input_audio` as base64 data and a format), `max_tokens`,
`temperature`, `stop` and `stream` (server-sent events), and OpenAI function calling (`tools`, `tool_choice`,
`tool_calls`, `role: "tool"`: `xllm.apps.tool_calls`); `GET /v1/models` lists the one model; `GET /` is a page
to upload an image, ask, and watch the answer stream. Requests generate together, joining and leaving the running
batch between decode steps (`xllm.apps.continuous`; `--batching dynamic`: `xllm.apps.batching`), each with its own
settings; a full queue is a 503; a client that goes away frees its row. Errors use OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`).

Binds to 127.0.0.1 unless told otherwise. Behind a load balancer, run one `xllm serve` per GPU/replica: each is
stateless between requests (the conversation travels in `messages`), so no controller is needed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import re
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from xllm.apps.batching import BatchGenerator, Generation, QueueFull
from xllm.apps.continuous import ContinuousBatcher
from xllm.apps.tool_calls import (ToolCallStream, ToolRequestError, checked_turns, message_tool_fields,  # tools hook
                                  tool_reply, tool_settings, with_constraint)
from xllm.extras import import_optional
from xllm.model import XLLM

# The web framework is the `serve` extra: checked first, so a missing one is one line naming the extra.
import_optional("fastapi", "serve", "xllm serve")
import_optional("uvicorn", "serve", "xllm serve")
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.concurrency import run_in_threadpool  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse  # noqa: E402

# A data: URL's MIME type -> the file suffix decoders recognise, where it is not the subtype itself.
MIME_SUFFIXES = {"video/x-matroska": "mkv", "video/quicktime": "mov", "video/x-msvideo": "avi", "audio/mpeg": "mp3",
                 "audio/x-wav": "wav", "audio/wave": "wav", "audio/x-flac": "flac", "audio/x-m4a": "m4a"}
MEDIA_FORMAT = re.compile(r"[a-z0-9]{1,8}")  # a `{"data", "format"}` part's format: a file suffix, nothing more


class RequestError(ValueError):
    """A bad request: answered with HTTP 400 and OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def error_response(message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


class ChatCompletions:
    """Turns OpenAI requests into generations that the scheduler runs in batches, and answers them.

    Args:
        model: the loaded model.
        name: the model id clients send and see.
        media_dirs: folders whose files a request may name by path (none: only `data:` URLs).
        max_media: most media items in one request.
        max_batch: most requests generated together.
        max_queue: most requests waiting; more get a 503.
        batch_wait_s: dynamic batching: how long a batch's first request waits for others to join it.
        batching: `continuous` (rows join and leave between decode steps, `xllm.apps.continuous`) or `dynamic`
            (requests that arrive together run one `generate` to its end, `xllm.apps.batching`).
        prefix_cache_mb: continuous batching: megabytes of keys/values of recent prompts and replies kept for
            later requests that begin the same way (0: none).
    """

    def __init__(self, model: XLLM, name: str, media_dirs: Sequence[str | Path] = (), max_media: int = 8,
                 max_batch: int = 8, max_queue: int = 64, batch_wait_s: float = 0.1, batching: str = "continuous",
                 prefix_cache_mb: float = 256.0) -> None:
        self.model, self.name, self.max_media = model, name, max_media
        self.media_dirs = [Path(d).resolve() for d in media_dirs]
        if batching == "continuous":
            self.batches = ContinuousBatcher(model, max_batch=max_batch, max_queue=max_queue,
                                             prefix_cache_mb=prefix_cache_mb)
        elif batching == "dynamic":
            self.batches = BatchGenerator(model, max_batch=max_batch, max_queue=max_queue, window_s=batch_wait_s)
        else:
            raise ValueError(f"batching must be continuous or dynamic, not {batching!r}")
        # content-part type -> the modality that reads it, as the adapter's interfaces declare them
        self.part_modalities = {part: m for m, i in model.interfaces.items() for part in i.content_parts}

    # --- requests ------------------------------------------------------------------------------------
    def _media_path(self, url: str, folder: Path, index: int, param: str) -> str:
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if ";base64" not in header:
                raise RequestError("a data: URL must be base64-encoded", param)
            mime = header[5:].split(";")[0]
            suffix = "." + MIME_SUFFIXES.get(mime, mime.split("/")[-1]) if "/" in mime else ""
            path = folder / f"media_{index}{suffix}"
            try:
                path.write_bytes(base64.b64decode(payload, validate=True))
            except (binascii.Error, ValueError) as err:
                raise RequestError(f"media {index + 1}: invalid base64 ({err})", param) from err
            return str(path)
        path = Path(url.removeprefix("file://")).resolve()
        if not any(path.is_relative_to(d) for d in self.media_dirs):
            raise RequestError(f"media {index + 1}: {url} is not a data: URL and not inside a folder this server "
                               "may read (xllm serve --media_dir)", param)
        if not path.is_file():
            raise RequestError(f"media {index + 1}: no such file {url}", param)
        return str(path)

    def _media_part(self, kind: Any, part: dict, param: str) -> tuple[str, str]:
        """`(modality, url)` of a media content part, or a 400 naming the part type and what this adapter reads."""
        if kind not in self.part_modalities:
            readable = ", ".join(["text", *self.part_modalities])
            raise RequestError(f"unsupported content part {kind!r}: this model reads {readable}", param)
        modality, payload = self.part_modalities[kind], part.get(kind)
        if not isinstance(payload, dict):
            raise RequestError(f"a {kind} part needs a {kind} object", param)
        if "url" in payload:
            return modality, str(payload["url"])
        if not MEDIA_FORMAT.fullmatch(str(payload.get("format", ""))):
            raise RequestError(f"a {kind} part needs a url, or base64 data and a format such as wav or mp4", param)
        return modality, f"data:{modality}/{payload['format']};base64,{payload.get('data', '')}"

    def parse(self, body: Any, folder: Path) -> tuple[list[dict], dict[str, list[str]], dict[str, Any]]:
        """`(turns, media, generation settings)` of a request; media from data: URLs are written into `folder`."""
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            raise RequestError("'messages' must be a non-empty list", "messages")
        turns, media, count = [], {}, 0
        for number, message in enumerate(body["messages"]):
            param = f"messages[{number}]"
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool"):
                raise RequestError("each message needs a role: system, user, assistant or tool", param)
            content = message.get("content")
            content = "" if content is None and message.get("tool_calls") else content  # tools hook: calls only
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise RequestError("content must be a string or a list of parts", param)
            value = ""
            for part in parts:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    value += part["text"]
                    continue
                modality, url = self._media_part(kind, part, param)
                if message["role"] not in ("user", "tool"):  # tools hook: a tool may return a picture
                    raise RequestError("media belong in user (or tool) messages", param)
                count += 1
                if count > self.max_media:
                    raise RequestError(f"too many media items: at most {self.max_media} per request", param)
                media.setdefault(modality, []).append(self._media_path(url, folder, count - 1, param))
                value += self.model.interfaces[modality].placeholder + "\n"
            turns.append({"from": message["role"], "value": value, **message_tool_fields(message)})  # tools hook
        try:  # tools hook: calls and results paired, the request's tools and tool_choice read
            turns, tools = checked_turns(turns), tool_settings(body)
        except ToolRequestError as err:
            raise RequestError(str(err), err.param) from err
        if turns[-1]["from"] not in ("user", "tool"):
            raise RequestError("the last message must be the user's (or a tool's result)", "messages")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 256))
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
            raise RequestError("max_tokens must be an integer from 1 to 4096", "max_tokens")
        temperature = body.get("temperature") or 0.0
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise RequestError("temperature must be a number ≥ 0", "temperature")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(t, str) and t for t in stop):
            raise RequestError("stop must be a string or a list of at most 4 non-empty strings", "stop")
        return turns, media, {"max_new_tokens": max_tokens, "temperature": float(temperature), "stop": stop, **tools}

    def prompt_tokens(self, turns: list[dict], media: dict[str, list[str]], tools: list | None = None) -> int:
        """Text tokens of the prompt plus each media item's token count (its interface's maximum)."""
        ids = self.model.processor().encode_prompt(turns, tools)["input_ids"]
        text = sum(1 for i in ids if i >= 0)
        return text + sum(self.model.interfaces[m].max_tokens * len(paths) for m, paths in media.items())

    def usage(self, turns: list[dict], media: dict[str, list[str]], generation: Generation) -> dict[str, int]:
        prompt, completion = self.prompt_tokens(turns, media, generation.tools), generation.tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def start(self, turns, media, settings) -> Generation:
        """Queue a request's generation (its media decoded here, in the request's thread: a bad file is its own
        400); `QueueFull` when the server already holds `max_queue` requests."""
        loaded = self.model.processor().load_media([media])[0]
        settings = with_constraint(settings, self.model.tokenizer, self.batches.eos_ids)  # tools hook
        return self.batches.submit(Generation(turns, loaded, **settings))

    # --- answers -------------------------------------------------------------------------------------
    def complete(self, generation: Generation, turns, media) -> dict[str, Any]:
        reply = generation.wait()
        usage, finish = self.usage(turns, media, generation), generation.finish
        message = {"role": "assistant", "content": reply}
        if generation.tools:  # tools hook: the reply's calls, if it made any
            message, finish = tool_reply(reply, generation.tools, finish)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "usage": usage,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}]}

    def chunks(self, generation: Generation, turns, media) -> Iterator[str]:
        """Server-sent events: a role chunk, one chunk per streamed piece, a finish chunk with usage, [DONE]."""
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def event(delta: dict, finish: str | None = None, **extra) -> str:
            chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(chunk)}\n\n"

        yield event({"role": "assistant", "content": ""})
        calls = ToolCallStream(generation.tools) if generation.tools else None  # tools hook
        try:
            for piece in generation.pieces():
                for delta in calls.feed(piece) if calls else [{"content": piece}]:  # tools hook
                    yield event(delta)
        except Exception as err:  # the batch failed after the stream began: say so in the stream
            yield f"data: {json.dumps({'error': {'message': str(err), 'type': 'server_error'}})}\n\n"
            return
        for delta in calls.close() if calls else []:  # tools hook: held-back text, or the calls
            yield event(delta)
        finish = calls.finish_reason(generation.finish) if calls else generation.finish
        yield event({}, finish, usage=self.usage(turns, media, generation))
        yield "data: [DONE]\n\n"


async def cancel_when_gone(request: Request, generation: Generation, poll_s: float = 0.1) -> None:
    """Cancel `generation` if its client disconnects first, freeing its row (ASGI reports a disconnect only to
    `receive`, so it is polled)."""
    while generation.finish is None:
        if await request.is_disconnected():
            generation.cancel()
            return
        await asyncio.sleep(poll_s)


def create_app(completions: ChatCompletions, max_request_bytes: int = 20 * 2**20) -> FastAPI:
    """The FastAPI app: /v1/chat/completions, /v1/models and the page at /."""
    app = FastAPI(title="xllm", docs_url=None, redoc_url=None)
    watchers: set[asyncio.Task] = set()  # held until done (the event loop keeps only weak references to tasks)

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": completions.name, "object": "model", "created": 0,
                                            "owned_by": "xllm"}]}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return (Path(__file__).parent / "serve_page.html").read_text()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and int(declared) > max_request_bytes:
            return error_response(f"request of {declared} bytes is over this server's limit of {max_request_bytes}",
                                  413)
        raw = await request.body()
        if len(raw) > max_request_bytes:
            return error_response(f"request over this server's limit of {max_request_bytes} bytes", 413)
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as err:
            return error_response(f"the body is not JSON: {err}")
        try:
            with tempfile.TemporaryDirectory(prefix="xllm-serve-") as folder:
                turns, media, settings = completions.parse(body, Path(folder))
                # Media are decoded before queueing: a bad file is a 400, not an event mid-stream.
                generation = await run_in_threadpool(completions.start, turns, media, settings)
        except RequestError as err:
            return error_response(str(err), param=err.param)
        except QueueFull as err:
            return error_response(str(err), 503, kind="server_error")
        except ValueError as err:  # an undecodable image or clip: the model names the file
            return error_response(str(err).replace(folder + "/", ""))
        watcher = asyncio.create_task(cancel_when_gone(request, generation))
        watchers.add(watcher)
        watcher.add_done_callback(watchers.discard)
        if body.get("stream"):
            return StreamingResponse(completions.chunks(generation, turns, media), media_type="text/event-stream")
        return await run_in_threadpool(completions.complete, generation, turns, media)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="xllm serve", description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True, help="adapter directory (written by training)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes it to the network: only on purpose")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--name", default=None, help="model id clients use (default: the adapter folder's name)")
    parser.add_argument("--media_dir", action="append", default=[], help="a folder requests may name files in")
    parser.add_argument("--max_media", type=int, default=8, help="most media items per request")
    parser.add_argument("--max_request_mb", type=float, default=20.0)
    parser.add_argument("--max_batch", type=int, default=8, help="most requests generated together")
    parser.add_argument("--max_queue", type=int, default=64, help="most requests waiting; more get a 503")
    parser.add_argument("--batching", choices=["continuous", "dynamic"], default="continuous",
                        help="continuous: requests join and leave the batch between decode steps; dynamic: requests "
                             "that arrive together run to the end of their longest reply")
    parser.add_argument("--prefix_cache_mb", type=float, default=256.0,
                        help="continuous: keys/values of recent prompts kept for requests that begin the same way")
    parser.add_argument("--batch_wait_ms", type=float, default=100.0,
                        help="dynamic: how long a batch's first request waits for others to join it")
    parser.add_argument("--llm", default=None, help="load the LLM from here instead of the adapter's path")
    parser.add_argument("--encoder", action="append", default=[], metavar="MODALITY=PATH")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args(argv)
    import uvicorn

    encoders = dict(item.split("=", 1) for item in args.encoder)
    model = XLLM.from_pretrained(args.adapter, llm=args.llm, encoders=encoders or None, device=args.device,
                                 dtype=args.dtype)
    completions = ChatCompletions(model, args.name or Path(args.adapter).resolve().name, args.media_dir,
                                  args.max_media, args.max_batch, args.max_queue, args.batch_wait_ms / 1000,
                                  args.batching, args.prefix_cache_mb)
    uvicorn.run(create_app(completions, int(args.max_request_mb * 2**20)), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
