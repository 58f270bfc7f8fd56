"""Limits on what a request may carry, enforced before any endpoint sees it.

- `BodySizeLimit`: a body over `max_bytes` gets 413, whether its size is declared
  (`Content-Length`) or it arrives in chunks (`Transfer-Encoding: chunked`), without the rest
  being read. A chunked body is only measured while the endpoint reads it, so the refusal is
  raised from inside the read as an `HTTPException(413)`: FastAPI passes HTTP exceptions raised
  while it reads a body through (anything else becomes a 400).
- `NoNulInUrl`: a NUL byte in the path or a query parameter gets 422 naming the parameter.
  PostgreSQL refuses NUL in text (`DataError`, a 500 if it reached a query), so it is refused
  at the edge for every endpoint at once.
- `JsonDepthLimit`: a body whose JSON nests deeper than `worker.spec.MAX_JSON_DEPTH` gets 422
  at `body`, counted on the bytes as they arrive (brackets outside strings), before anything
  parses it: Python's JSON parser and every walk over the parsed value recurse, and ~1,000
  levels fit in a few kilobytes.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.json_depth import DepthScanner, json_depth_exceeded
from worker.spec import MAX_JSON_DEPTH

__all__ = ["BodySizeLimit", "JsonDepthLimit", "NoNulInUrl", "json_depth_exceeded"]


class BodySizeLimit:
    """Answer 413 to a body over `max_bytes` (declared or streamed) without reading the rest."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _answer(send, 413, {"detail": _too_large(self.max_bytes)})
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLargeError(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLargeError:  # read outside FastAPI's body parsing (e.g. a plain route)
            if not started:
                await _answer(send, 413, {"detail": _too_large(self.max_bytes)})


class JsonDepthLimit:
    """Answer 422 to a body whose JSON nests deeper than `max_depth`, as it streams in."""

    def __init__(self, app: ASGIApp, max_depth: int = MAX_JSON_DEPTH) -> None:
        self.app, self.max_depth = app, max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scanner = DepthScanner(self.max_depth)
        started = False

        async def scanning_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and scanner.feed(message.get("body", b"")):
                raise _TooDeepError(self.max_depth)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, scanning_receive, tracking_send)
        except _TooDeepError as exc:  # read outside FastAPI's body parsing
            if not started:
                await _answer(send, 422, {"detail": exc.detail})


class NoNulInUrl:
    """Answer 422 to a request whose path or a query parameter contains a NUL byte."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = _nul_problem(scope)
            if problem is not None:
                await _answer(send, 422, {"detail": [problem]})
                return
        await self.app(scope, receive, send)


def _nul_problem(scope: Scope) -> dict[str, object] | None:
    message = "must not contain a NUL byte (\\u0000)"
    if "\x00" in scope.get("path", ""):
        return {"loc": ["path"], "msg": message, "type": "nul_byte"}
    query = scope.get("query_string", b"").decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            shown = name.replace("\x00", "\\u0000").encode("utf-8", "backslashreplace").decode()
            return {"loc": ["query", shown], "msg": message, "type": "nul_byte"}
    return None


def _too_large(max_bytes: int) -> str:
    return f"request body too large: at most {max_bytes} bytes"


async def _answer(send: Send, status: int, content: object) -> None:
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _BodyTooLargeError(HTTPException):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, detail=_too_large(max_bytes))


class _TooDeepError(HTTPException):
    def __init__(self, max_depth: int) -> None:
        message = f"JSON nested deeper than {max_depth} levels; a study spec needs far fewer"
        super().__init__(422, detail=[{"loc": ["body"], "msg": message, "type": "json_depth"}])
