"""A real HTTP server on a free localhost port that receives webhooks for tests, and records them.

    with WebhookReceiver() as receiver:
        url = receiver.url("/ok")                  # http://127.0.0.1:<port>/ok
        ...
        receiver.requests("/ok")                    # [Received(path, headers, body, at), …]

Behaviour by path (the first segment; anything after it is free, e.g. /ok/tenant-b):
  /ok        answers 204
  /flaky     answers 500 to the first two requests carrying a given webhook-id, then 204
  /fail      always answers 500 ("receiver broken")
  /hang      never answers: the request is held open until the receiver closes
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() when the request arrived

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get("webhook-id")


class WebhookReceiver:
    def __init__(self):
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self.release = threading.Event()  # set on close: held /hang requests end
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                entry = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time())
                with receiver.lock:
                    receiver.received.append(entry)
                    seen = sum(1 for r in receiver.received if r.webhook_id == entry.webhook_id and r.path == entry.path)
                kind = self.path.strip("/").split("/", 1)[0]
                if kind == "hang":
                    receiver.release.wait()
                    return
                if kind == "fail" or (kind == "flaky" and seen <= 2):
                    self._answer(500, b"receiver broken")
                else:
                    self._answer(204, b"")

            def _answer(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def requests(self, path: str | None = None) -> list[Received]:
        with self.lock:
            return [r for r in self.received if path is None or r.path == path]

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
