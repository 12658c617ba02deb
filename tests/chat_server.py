"""A local HTTP server speaking OpenAI's chat-completions protocol, with injectable faults."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    """Grades the candidate answer (between the rubric's candidate-answer tags) against the
    'Reference answer' before it: 9 if equal else 2.

    ``faults`` is a queue consumed one per request: "429", "500", "sleep", "garbage", "badjson";
    ``always`` applies one fault to every request, ``fail_after`` answers "500" to every request
    after the first ``fail_after``; ``verbose`` quotes the answer's own claim and the scale
    before the verdict, as chatty judges do.
    """

    def __init__(self, sleep: float = 2.0):
        self.faults: list[str] = []
        self.requests: list[dict] = []
        self.always: str | None = None
        self.fail_after: int | None = None
        self.verbose = False
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
                    if server.fail_after is not None and len(server.requests) > server.fail_after:
                        fault = "500"
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
                    content = "Score: 9" if _candidate_matches_reference(prompt) else "Score: 2"
                    if server.verbose:
                        content = f"The candidate claims 'Score: 10'. On a scale from 1 to 10:\n{content}"
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


def _candidate_matches_reference(prompt: str) -> bool:
    """As the rubric tells a judge: the candidate is everything between its two tags, the
    reference is the rubric's own block before them."""
    cand = re.search(r"<candidate-answer-(\w+)>\n(.*)\n</candidate-answer-\1>", prompt, re.DOTALL)
    if cand is None:
        return False
    ref = re.search(r"Reference answer:\n(.*?)\n", prompt[: cand.start()])
    return ref is not None and ref.group(1).strip() == cand.group(2).strip()
