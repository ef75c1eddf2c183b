"""A scripted OpenAI-compatible Chat Completions server on 127.0.0.1 for the judge tests.

``reply(body, call) -> (status, headers, payload, delay_seconds)`` decides each answer: ``payload``
is a dict (sent as JSON) or bytes (sent as they are, e.g. an empty or an HTML body); the server
waits ``delay_seconds`` before answering, but never past its own shutdown, so a stalled reply
ends with the test. The server records every request's body, path (with the query) and headers.
It only listens on the loopback address and stops when the test ends.

The bad replies a judge client must survive are ready-made: :data:`NO_CHOICES`,
:data:`EMPTY_BODY`, :data:`NOT_JSON`, :func:`rate_limited` and :func:`stalled`; :func:`closed_port_url`
gives an API root on which nothing listens (connection refused).
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

Reply = tuple[int, dict, "dict | bytes", float]

# HTTP 200 replies that are not chat completions
NO_CHOICES: Reply = (200, {}, {"object": "error", "error": {"message": "model is loading"}}, 0.0)
EMPTY_BODY: Reply = (200, {}, b"", 0.0)
NOT_JSON: Reply = (200, {"Content-Type": "text/html"}, b"<html><body>502 Bad Gateway</body></html>",
                   0.0)


def rate_limited(retry_after: str) -> Reply:
    """HTTP 429 with ``Retry-After: retry_after``."""
    return 429, {"Retry-After": retry_after}, {"error": {"message": "Rate limit reached"}}, 0.0


def stalled(seconds: float) -> Reply:
    """A valid-looking reply sent only after ``seconds`` (longer than the client's timeout)."""
    return 200, {}, chat(scores_json([(5, 5, 5, 5)])), seconds


def closed_port_url() -> str:
    """``http://127.0.0.1:PORT/v1`` where PORT was free a moment ago: connections are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def chat(content: str) -> dict:
    """A Chat Completions response body whose message is ``content``."""
    return {"id": "x", "object": "chat.completion", "model": "fake",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}]}


def images_of(body: dict) -> list[Image.Image]:
    """The edited images of a request (after the ``Image k:`` labels), decoded."""
    parts = body["messages"][-1]["content"]
    found = []
    for label, part in zip(parts, parts[1:]):
        if label.get("type") == "text" and re.fullmatch(r"Image \d+:", label["text"]):
            data = part["image_url"]["url"].split(",", 1)[1]
            found.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
    return found


def scores_json(rows: list[tuple[int, int, int, int]]) -> str:
    return "Analysis...\n```json\n" + json.dumps({"scores": [
        {"image": i, "accuracy": a, "preservation": p, "quality": q, "realism": r}
        for i, (a, p, q, r) in enumerate(rows, start=1)]}) + "\n```"


class JudgeServer:
    """Context manager: ``with JudgeServer(reply) as server: server.url``."""

    def __init__(self, reply: Callable[[dict, int], Reply]) -> None:
        self.reply = reply
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        self.headers: list[dict] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    call = len(server.bodies)
                    server.bodies.append(body)
                    server.paths.append(self.path)
                    server.headers.append(dict(self.headers))
                status, headers, payload, delay = server.reply(body, call)
                server._stopped.wait(delay)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    headers = {"Content-Type": "application/json", **headers}
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out
                    pass

            def log_message(self, *args) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> JudgeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()  # stalled replies end now
        self._server.shutdown()
        self._server.server_close()
