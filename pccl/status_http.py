"""A minimal read-only HTTP/1.1 server for the master's status page (``docs/protocol.md`` §8).

``GET /`` is the HTML page (:data:`pccl.status_page.PAGE`), ``GET /status.json`` the
snapshot; anything else is 404 (405 for other methods). One request per connection
(``Connection: close``), so there is no keep-alive state to bound. The request head
is limited to :data:`MAX_HEAD` bytes and must arrive within ``read_timeout``; at most
:data:`MAX_CLIENTS` connections are served at once. The server runs on the master's
event loop, so every snapshot sees the state between two events.

The endpoint is unauthenticated (it reveals peer addresses and kick reasons, and
changes nothing): keep it on loopback or behind a firewall.

:func:`parse_request` and :func:`respond` are pure; :class:`StatusServer` only moves bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pccl.errors import MasterConnectionError
from pccl.status_page import PAGE

log = logging.getLogger("pccl.status")

MAX_HEAD = 8 * 1024
MAX_CLIENTS = 32
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0

REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    503: "Service Unavailable", 505: "HTTP Version Not Supported",
}
# The page needs its own inline script and style and same-origin fetch(); nothing else.
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class RequestError(ValueError):
    """A request this server answers with an error ``status`` (never leaves this module)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Request:
    """The parts of a request line the server uses."""

    method: str
    path: str


@dataclass(frozen=True)
class Response:
    """A complete response: ``status``, extra headers and ``body``."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self, head_only: bool = False) -> bytes:
        """The response bytes (without the body for ``HEAD``)."""
        lines = [
            f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Unknown')}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "Connection: close",
            "X-Content-Type-Options: nosniff",
            "Referrer-Policy: no-referrer",
            *(f"{k}: {v}" for k, v in self.headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        return head if head_only else head + self.body


def parse_request(head: bytes) -> Request:
    """Parse a request head (request line and header lines, up to the blank line).

    Raises:
        RequestError: malformed (400), a method other than GET/HEAD (405), not HTTP/1.x (505).
    """
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise RequestError(400, "request head is not ASCII") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not all(parts):
        raise RequestError(400, "malformed request line")
    method, target, version = parts
    if not version.startswith("HTTP/1."):
        raise RequestError(505 if version.startswith("HTTP/") else 400, f"unsupported version {version[:16]!r}")
    for line in lines[1:]:
        if line and (":" not in line or line[0] in " \t"):
            raise RequestError(400, "malformed header line")
    if not target.startswith("/"):
        raise RequestError(400, "only origin-form request targets are served")
    if method not in ("GET", "HEAD"):
        raise RequestError(405, f"method {method[:16]!r} not allowed")
    return Request(method, target.split("?", 1)[0].split("#", 1)[0])


def respond(request: Request, snapshot: Callable[[], Mapping[str, Any]]) -> Response:
    """Route ``request``: the page, the snapshot as JSON, or 404. Raises what ``snapshot`` raises."""
    if request.path in ("/", "/index.html"):
        return Response(200, "text/html; charset=utf-8", PAGE.encode("utf-8"), (("Content-Security-Policy", PAGE_CSP),))
    if request.path == "/status.json":
        body = json.dumps(snapshot(), separators=(",", ":")).encode("utf-8")
        return Response(200, "application/json", body)
    return error_response(404, f"no such page: {request.path[:200]}")


def error_response(status: int, message: str) -> Response:
    """A plain-text error response."""
    allow = (("Allow", "GET, HEAD"),) if status == 405 else ()
    return Response(status, "text/plain; charset=utf-8", (message + "\n").encode("utf-8"), allow)


class StatusServer:
    """Serves the status page on the running event loop; ``snapshot()`` is called per JSON request."""

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]], *, read_timeout: float = READ_TIMEOUT) -> None:
        self._snapshot = snapshot
        self._read_timeout = read_timeout
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self.host = ""
        self.port = 0

    @property
    def active_clients(self) -> int:
        """Connections being served now."""
        return len(self._clients)

    @property
    def url(self) -> str:
        """``http://host:port/`` of the page (loopback for a wildcard host)."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else ("::1" if self.host == "::" else self.host)
        return f"http://[{host}]:{self.port}/" if ":" in host else f"http://{host}:{self.port}/"

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (0: a free port, in ``self.port`` afterwards).

        Raises:
            MasterConnectionError: the address cannot be bound.
        """
        try:
            self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD)
        except OSError as exc:
            raise MasterConnectionError(f"cannot serve the status page on {host}:{port}: {exc}") from exc
        self.host = host
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and drop every open client connection. Raises nothing."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._clients)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= MAX_CLIENTS:
            writer.write(error_response(503, "too many status clients").encode())
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self._client(reader, writer))
        self._clients.add(task)
        task.add_done_callback(self._clients.discard)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            response, head_only = await self._answer(reader)
            if response is not None:
                writer.write(response.encode(head_only))
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.drain()
        except (OSError, TimeoutError):
            pass  # the client went away or stalled: nothing to tell it
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[Response | None, bool]:
        """The response to the request on ``reader`` (None: the client sent nothing usable)."""
        try:
            async with asyncio.timeout(self._read_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return error_response(431, f"request head over {MAX_HEAD} bytes"), False
        except asyncio.IncompleteReadError:
            return None, False
        except TimeoutError:
            return error_response(400, "request head not received in time"), False
        try:
            request = parse_request(head[:-4])
        except RequestError as exc:
            return error_response(exc.status, str(exc)), False
        try:
            return respond(request, self._snapshot), request.method == "HEAD"
        except Exception:  # a bug in the snapshot must not take the master down
            log.exception("status snapshot failed")
            return error_response(500, "status snapshot failed; see the master's log"), False
