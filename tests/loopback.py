"""A local HTTP server for download tests (a helper module, not a test module).

    with serve({"a.zip": b"...", "b.tar": Path(...)}, truncate={"a.zip": 1000}) as server:
        fetch("a.zip", {"url": server.url("a.zip")}, ...)
        server.requests  # [("/a.zip", None), ("/a.zip", "bytes=1000-"), ...]

- ThreadingHTTPServer on 127.0.0.1, a free port, in a daemon thread; quiet (no request log).
- HEAD and GET; `Range: bytes=N-` (or `bytes=N-M`) answered 206 with Content-Range, and a range
  starting at or past the end answered 416 with `Content-Range: bytes */<size>`; unknown names 404.
- `truncate[name] = k`: every response for `name` announces its full Content-Length but the
  connection is closed after k body bytes of that response.
- `ignore_range=True`: Range headers are ignored (always 200 with the whole file).
- The `files` mapping is looked up on every request and Path values are read then, so a test may
  change what is served (assign to the dict, or rewrite the file) while the server runs.
- `requests`: (request path as sent, e.g. "/a.zip", Range header or None), in arrival order.
"""

from __future__ import annotations

import re
import threading
import urllib.parse
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class Loopback:
    def __init__(self, port: int):
        self.port = port
        self.requests: list[tuple[str, str | None]] = []

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client hanging up early is expected here
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: closing it ends the response

    def log_message(self, format, *args):
        pass

    def do_HEAD(self):
        self._answer(send_body=False)

    def do_GET(self):
        self._answer(send_body=True)

    def _answer(self, send_body: bool) -> None:
        state = self.server.state
        range_header = self.headers.get("Range")
        state["loopback"].requests.append((self.path, range_header))
        name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path.lstrip("/"))
        source = state["files"].get(name)
        if source is None:
            self.send_error(404, "no such file")
            return
        data = source.read_bytes() if isinstance(source, Path) else bytes(source)

        status, start, end = 200, 0, len(data)
        match = _RANGE.match(range_header or "")
        if match and not state["ignore_range"]:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if match.group(2):
                end = min(end, int(match.group(2)) + 1)
            status = 206
        body = data[start:end]

        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if not send_body:
            return
        cut = state["truncate"].get(name)
        self.wfile.write(body if cut is None else body[:cut])
        self.wfile.flush()
        self.close_connection = True


@contextmanager
def serve(files: dict[str, bytes | Path], *, truncate: dict[str, int] | None = None,
          ignore_range: bool = False):
    """Serve `files` (name -> bytes or a Path read on each request) at http://127.0.0.1:<port>/<name>;
    yields an object with .url(name) and .requests (see the module docstring)."""
    server = _Server(("127.0.0.1", 0), _Handler)
    loopback = Loopback(server.server_address[1])
    server.state = {"loopback": loopback, "files": files, "truncate": dict(truncate or {}),
                    "ignore_range": ignore_range}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield loopback
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
