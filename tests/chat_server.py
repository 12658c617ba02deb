"""A local HTTP server speaking OpenAI's chat-completions protocol, with injectable faults."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    """Grades 'Candidate answer' against 'Reference answer' in the prompt: 9 if equal else 2.

    ``faults`` is a queue consumed one per request: "429", "500", "sleep", "garbage", "badjson".
    """

    def __init__(self, sleep: float = 2.0):
        self.faults: list[str] = []
        self.requests: list[dict] = []
        self.always: str | None = None
        self.sleep = sleep
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._json(200, {"object": "list", "data": [{"id": "judge", "object": "model"}]})
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append(body)
                    fault = server.always or (server.faults.pop(0) if server.faults else None)
                if fault == "429":
                    return self._json(429, {"error": {"message": "rate limited"}},
                                      {"retry-after-ms": "10", "retry-after": "0"})
                if fault == "500":
                    return self._json(500, {"error": {"message": "boom"}}, {"retry-after-ms": "10"})
                if fault == "sleep":
                    time.sleep(server.sleep)
                if fault == "badjson":
                    data = b"<html>not json</html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                prompt = body["messages"][-1]["content"]
                if fault == "garbage":
                    content = "What a lovely answer, truly."
                else:
                    ref = re.search(r"Reference answer:\n(.*?)\n", prompt)
                    cand = re.search(r"Candidate answer:\n(.*?)\n", prompt)
                    good = ref and cand and ref.group(1).strip() == cand.group(1).strip()
                    content = "Score: 9" if good else "Score: 2"
                self._json(200, {
                    "id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
                })

            def _json(self, status, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except BrokenPipeError:
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ChatServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
