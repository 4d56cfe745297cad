"""ASGI middleware of the gateway: a request body limit for every route, a login page that does not give
away the API description (model and variant names) before anyone logged in, and the login for the routes
Gradio answers without it."""

from __future__ import annotations

import json
import re


class BodySizeLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 {"error": ...} and is not read further.

    A declared Content-Length over the limit is refused before any byte is read; a body without one (chunked)
    is counted while the app reads it. An unreadable Content-Length gets 400.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                return await self._reply(send, 400, f"Content-Length {declared[:40]!r} is not a number")
            if length > self.max_bytes:
                return await self._reply(send, 413, self._message(length))
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await self._reply(send, 413, self._message(received, declared=False))

    def _message(self, size: int, declared: bool = True) -> str:
        what = f"{size} bytes" if declared else f"more than {self.max_bytes} bytes (read {size})"
        return (f"the request body has {what}; the gateway's limit is {self.max_bytes} bytes "
                "(limits.max_body_bytes): send a smaller text or image")

    @staticmethod
    async def _reply(send, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


class LoginPageScrub:
    """ASGI middleware for gateways with a login: Gradio 6 embeds the API description (every endpoint with its
    choices: the repository's model and variant names) in the login page it shows before anyone logged in; this
    empties it there. Pages shown after the login keep it."""

    _API_INFO = re.compile(rb"window\.gradio_api_info = .*?;</script>", re.S)
    _LOGIN_PAGE = re.compile(rb'"auth_required":\s*true')

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "GET":
            return await self.app(scope, receive, send)
        held: dict = {}
        chunks: list[bytes] = []

        async def scrubbing_send(message):
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                if headers.get(b"content-type", b"").startswith(b"text/html"):
                    held["start"] = message  # sent once the whole page is here
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = b"".join(chunks)
                if self._LOGIN_PAGE.search(body):
                    body = self._API_INFO.sub(b"window.gradio_api_info = {};</script>", body)
                start = held.pop("start")
                headers = [(k, v) for k, v in start.get("headers") or [] if k.lower() != b"content-length"]
                await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, scrubbing_send)


class LoginRequired:
    """ASGI middleware for gateways with a login: requests for `paths` (routes Gradio answers without its login:
    its OpenAPI description /openapi.json and /gradio_api/startup-events) get 401 {"error": ...} unless
    `allowed(scope)` says the caller logged in (HTTP basic auth or Gradio's login cookie)."""

    def __init__(self, app, paths, allowed):
        self.app, self.paths, self.allowed = app, frozenset(paths), allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope["path"].rstrip("/") or "/") in self.paths and not self.allowed(scope):
            body = json.dumps({"error": "login required: HTTP basic auth with the gateway's user and password, "
                                        "or log in on the page"}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"www-authenticate", b'Basic realm="dyngate"')]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
