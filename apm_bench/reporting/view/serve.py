"""Serve a written page on 127.0.0.1, for browsers or setups that would rather not open `file://`."""

from __future__ import annotations

import functools
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
        pass


def page_server(page: Path, port: int) -> ThreadingHTTPServer:
    """A server of the page's folder bound to loopback only: nothing off this machine can reach it."""
    handler = functools.partial(_QuietHandler, directory=str(page.parent))
    return ThreadingHTTPServer(("127.0.0.1", port), handler)


def serve_page(page: Path, port: int, announce: Callable[[str], None]) -> None:
    """Serve until interrupted (Ctrl-C)."""
    with page_server(page, port) as server:
        announce(f"serving http://127.0.0.1:{server.server_address[1]}/{page.name} (Ctrl-C stops)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
