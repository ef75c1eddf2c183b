"""A scripted OpenAI-compatible Chat Completions server on 127.0.0.1 for the judge tests.

``reply(body, call) -> (status, headers, json_body, delay_seconds)`` decides each answer; the
server records every request body and its headers. It only listens on the loopback address and
stops when the test ends.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

Reply = tuple[int, dict, dict, float]


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
        self.headers: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    call = len(server.bodies)
                    server.bodies.append(body)
                    server.headers.append(dict(self.headers))
                status, headers, payload, delay = server.reply(body, call)
                time.sleep(delay)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Type", "application/json")
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
        self._server.shutdown()
        self._server.server_close()
