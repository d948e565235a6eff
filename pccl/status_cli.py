"""Show a running master's status: peers, rings, bandwidth, collectives, shared-state revisions, kicks.

Reads the status endpoint of a master started with --status-port (the same data
as its web page) and prints it as plain-text tables. Exits 1 when the endpoint
cannot be reached or does not answer with a status document.

examples:
  pccl status 127.0.0.1:48149
  pccl status http://10.0.0.1:48149/ --watch 2
  pccl status 127.0.0.1:48149 --json > status.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, TextIO

from pccl.errors import InvalidUsageError, MasterConnectionError
from pccl.status import format_status

DEFAULT_TIMEOUT = 5.0
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the ``pccl status`` options."""
    parser.add_argument("master", metavar="URL_OR_HOST:PORT", help="the master's status endpoint (its --status-port)")
    parser.add_argument("--json", action="store_true", help="print the raw status document instead of tables")
    parser.add_argument(
        "--watch", type=float, default=None, metavar="SECONDS",
        help="print again every SECONDS until interrupted (Ctrl-C)",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
        help=f"give up on one request after this long (default {DEFAULT_TIMEOUT:g})",
    )


def status_url(target: str) -> str:
    """The ``status.json`` URL for ``http://host:port[/prefix/]`` or ``host:port``.

    Raises:
        InvalidUsageError: ``target`` names no host and port, or another scheme than http.
    """
    text = target.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    try:
        port = parts.port
    except ValueError as exc:
        raise InvalidUsageError(f"{target!r}: invalid port") from exc
    if parts.scheme != "http" or not parts.hostname or port is None:
        raise InvalidUsageError(f"{target!r} is not HOST:PORT or http://HOST:PORT/ (the master's --status-port)")
    path = parts.path or "/"
    if not path.endswith("/status.json"):
        path = path.rstrip("/") + "/status.json"
    return urllib.parse.urlunsplit(("http", parts.netloc, path, "", ""))


def fetch(url: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """GET the status document at ``url`` (never through an HTTP proxy: the master is dialled directly).

    Raises:
        MasterConnectionError: unreachable, an HTTP error, or not a status document.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        raise MasterConnectionError(f"{url} answered HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise MasterConnectionError(f"cannot reach {url}: {exc.reason}") from exc
    except OSError as exc:  # a reset or timeout while reading the body
        raise MasterConnectionError(f"cannot read {url}: {exc}") from exc
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise MasterConnectionError(f"{url} did not answer with JSON: {exc}") from exc
    if not isinstance(doc, dict) or "peers" not in doc or "world" not in doc:
        raise MasterConnectionError(f"{url} did not answer with a pccl status document")
    return doc


def render(doc: dict[str, Any], as_json: bool) -> str:
    """The text printed for one status document.

    Raises:
        MasterConnectionError: the document lacks fields this version prints.
    """
    if as_json:
        return json.dumps(doc, indent=2) + "\n"
    try:
        return format_status(doc)
    except (KeyError, TypeError, ValueError) as exc:
        reason = f"unexpected status document (field {exc}); is the master another version?"
        raise MasterConnectionError(reason) from exc


def show(url: str, args: argparse.Namespace, out: TextIO) -> bool:
    """Fetch and print once; False (after printing why to stderr) when it failed."""
    try:
        text = render(fetch(url, args.timeout), args.json)
    except MasterConnectionError as exc:
        print(f"pccl status: {exc}", file=sys.stderr, flush=True)
        return False
    out.write(text)
    out.flush()
    return True


def run(args: argparse.Namespace) -> int:
    """Entry point of ``pccl status``: 0 when printed, 1 when unreachable, 2 for bad arguments."""
    try:
        url = status_url(args.master)
    except InvalidUsageError as exc:
        print(f"pccl status: {exc}", file=sys.stderr)
        return 2
    if args.watch is None:
        return 0 if show(url, args, sys.stdout) else 1
    if args.watch <= 0:
        print("pccl status: --watch needs a positive number of seconds", file=sys.stderr)
        return 2
    try:
        while True:
            if sys.stdout.isatty():
                sys.stdout.write(CLEAR_SCREEN)
            # A failure is printed and retried: watching through a master restart is the point.
            show(url, args, sys.stdout)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
