"""A scripted OpenAI-compatible server on 127.0.0.1 for base responses: ``GET /models`` and
``POST /completions`` (a list of prompts per request), every request recorded."""

from __future__ import annotations

import json
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class CompletionsServer:
    """Answers ``/models`` with ``served`` (or 404 when ``served`` is None) and each prompt of a
    ``/completions`` request with ``answer(prompt)``; ``failures`` holds ``(status, body)``
    replies sent first, one per request.

    Bounded: at most ``max_requests`` requests are answered (then 418, which clients do not
    retry), a handler gives up reading after 5 s, and a watchdog stops the server after
    ``lifetime`` seconds. Use it as a context manager.

    Args:
        served: the model names ``/models`` lists (None: no such route).
        answer: the completion text of a prompt.
        reply_model: the ``model`` each completions reply names (default: the one requested).
        lifetime: seconds before the server stops itself.
        max_requests: requests answered at most.
    """

    def __init__(self, served=("base-model",), answer: Callable[[str], str] = lambda prompt: "Fine.",
                 reply_model: str | None = None, lifetime: float = 60.0, max_requests: int = 200):
        self.requests: list[dict] = []
        self.failures: deque = deque()
        self.served, self.answer, self.reply_model = served, answer, reply_model
        self.max_requests = max_requests
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 5

            def _send(self, status: int, body) -> None:
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, payload):
                with server.lock:
                    server.requests.append({"method": self.command, "path": self.path,
                                            "headers": dict(self.headers), "json": payload})
                    count = len(server.requests)
                    failure = server.failures.popleft() if server.failures else None
                if count > server.max_requests:
                    return self._send(418, "too many requests for this test")
                if failure is not None:
                    return self._send(*failure)
                if self.command == "GET" and self.path.endswith("/models"):
                    if server.served is None:
                        return self._send(404, {"error": "no such route"})
                    return self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in server.served]})
                if self.command == "POST" and self.path.endswith("/completions"):
                    prompts = payload["prompt"] if isinstance(payload["prompt"], list) else [payload["prompt"]]
                    return self._send(200, {"id": "cmpl-test", "object": "text_completion",
                                            "model": server.reply_model or payload.get("model"),
                                            "choices": [{"index": i, "text": server.answer(p), "finish_reason": "stop"}
                                                        for i, p in enumerate(prompts)]})
                return self._send(404, {"error": f"no route {self.command} {self.path}"})

            def do_GET(self):
                self._handle(None)

            def do_POST(self):
                self._handle(json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))))

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.watchdog = threading.Timer(lifetime, self.httpd.shutdown)
        self.watchdog.daemon = True

    def completions(self) -> list[dict]:
        """The bodies of the ``/completions`` requests received."""
        return [r["json"] for r in self.requests if r["method"] == "POST"]

    def __enter__(self) -> CompletionsServer:
        self.thread.start()
        self.watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        self.watchdog.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
