"""A fake Kubernetes API serving one StatefulSet's `spec.replicas` (for the preStop hook)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

NAMESPACE = "shardq"
STATEFULSET = "broker"
TOKEN = "sa-token-for-tests"


class FakeKubeApi:
    """GET /apis/apps/v1/namespaces/{ns}/statefulsets/{name} -> {"spec": {"replicas": n}}.

    `replicas = None` answers 404 (the StatefulSet is gone); `status` other
    than 200 answers that status. Requests are recorded with their
    Authorization header. `bind` is the address it listens on.
    """

    def __init__(self, bind: str = "127.0.0.1") -> None:
        self.replicas: int | None = 3
        self.status = 200
        self.requests: list[tuple[str, str | None]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.requests.append((self.path, self.headers.get("Authorization")))
                want = f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/{STATEFULSET}"
                if fake.status != 200:
                    self._json(fake.status, {"kind": "Status", "code": fake.status})
                elif self.path != want or fake.replicas is None:
                    self._json(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                else:
                    self._json(200, {"kind": "StatefulSet", "apiVersion": "apps/v1",
                                     "metadata": {"name": STATEFULSET, "namespace": NAMESPACE},
                                     "spec": {"replicas": fake.replicas}})

            def _json(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((bind, 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
