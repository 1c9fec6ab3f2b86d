"""Local inference over HTTP, for device apps that do not embed :class:`~edgekit.agent.Agent`.

``edgekit-agent run`` starts it when the config says where to listen::

    [serve]
    listen = "127.0.0.1:8500"   # host:port; loopback unless a token is set
    token = ""                  # required when listening beyond this machine

Endpoints (JSON in, JSON out; errors are ``{"error": "..."}`` with a 4xx/5xx status):

- ``POST /v1/predict`` with ``{"inputs": X}`` runs the model once: X is one array (nested
  lists) for a single-input model, a list of arrays in input order, or an object by input name.
  With ``{"instances": [X1, X2, ...]}`` it runs once per instance. ``"raw": true`` skips the
  (de)quantization, as ``Agent.predict(raw=True)``. The reply is ``{"outputs": {name: array}}``
  (or ``{"predictions": [...]}`` for instances) with the serving bundle's name and version.
  A body of ``Content-Type: application/x-npy`` is one array in NumPy's ``.npy`` format.
- ``GET /v1/status``: what ``edgekit-agent status --json`` prints. ``GET /v1/drift``: the drift
  report (``null`` when the bundle carries no baseline).

Every request goes through ``Agent.predict``, so it is counted in telemetry and sampled for drift
exactly like an embedded call. Python's threading HTTP server is enough here: the model runs
under the agent's lock anyway, and it adds no dependency to the device.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

import numpy as np
from edgekit.errors import ConfigError, EdgekitError, InstallError

from .agent import Agent

__all__ = ["InferenceServer"]

log = logging.getLogger(__name__)

MAX_BODY = 32 * 1024 * 1024
LOCAL_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class InferenceServer:
    """Serves ``agent`` on ``host:port`` from a background thread. ``port=0`` picks a free one."""

    def __init__(self, agent: Agent, host: str, port: int, token: Optional[str] = None) -> None:
        if host not in LOCAL_HOSTS and not token:
            raise ConfigError(
                f"the inference server would listen on {host}, reachable from other machines; "
                "set serve.token in the agent config or listen on 127.0.0.1"
            )
        self.agent = agent
        self.token = token or None
        self.requests = 0
        self.rejected = 0
        handler = self._handler_class()
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} for inference: {exc.strerror}") from None
        self._server.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> InferenceServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="edgekit-inference", daemon=True
        )
        self._thread.start()
        log.info("agent %s: serving inference on %s", self.agent.config.device, self.url)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- requests ----------------------------------------------------------------------------

    def _authorized(self, header: Optional[str]) -> bool:
        if self.token is None:
            return True
        expected = f"Bearer {self.token}"
        return header is not None and hmac.compare_digest(header.encode(), expected.encode())

    def _predict(self, body: bytes, content_type: str) -> dict[str, Any]:
        if content_type.startswith("application/x-npy"):
            try:
                array = np.load(io.BytesIO(body), allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise _Refused(400, f"the body is not a .npy array: {exc}") from None
            request: dict[str, Any] = {"inputs": array}
        else:
            try:
                request = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raise _Refused(400, 'the body is not JSON; send {"inputs": [...]}') from None
            if not isinstance(request, dict) or ("inputs" in request) == ("instances" in request):
                raise _Refused(400, 'send a JSON object with either "inputs" or "instances"')
        raw = request.get("raw", False) is True
        loaded = self.agent.served_bundle()
        single = loaded is None or len(loaded.manifest.inputs) == 1

        def run(x: Any) -> Any:
            # JSON has no arrays: for a one-input model a nested list is that one array.
            value = np.asarray(x) if single and isinstance(x, list) else x
            return _jsonable(self.agent.predict(value, as_dict=True, raw=raw))

        reply: dict[str, Any] = {
            "bundle": {"name": loaded.manifest.name, "version": loaded.manifest.version} if loaded else None
        }
        if "instances" in request:
            instances = request["instances"]
            if not isinstance(instances, list):
                raise _Refused(400, '"instances" must be a list of inputs')
            reply["predictions"] = [run(x) for x in instances]
        else:
            reply["outputs"] = run(request["inputs"])
        return reply

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "edgekit-agent"

            def _reply(self, status: int, doc: Any) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                server.requests += 1
                doc: Any
                try:
                    if not server._authorized(self.headers.get("Authorization")):
                        raise _Refused(401, "missing or wrong token: send Authorization: Bearer TOKEN")
                    route = (method, self.path.split("?", 1)[0])
                    if route == ("POST", "/v1/predict"):
                        length = int(self.headers.get("Content-Length") or 0)
                        if length < 0:
                            raise _Refused(400, "bad request: a negative Content-Length")
                        if length > MAX_BODY:
                            raise _Refused(413, f"the body is over {MAX_BODY} bytes")
                        body = self.rfile.read(length)
                        doc = server._predict(body, self.headers.get("Content-Type", ""))
                    elif route == ("GET", "/v1/status"):
                        doc = server.agent.status().to_dict()
                    elif route == ("GET", "/v1/drift"):
                        report = server.agent.drift()
                        doc = report.to_dict() if report is not None else None
                    else:
                        raise _Refused(404, "unknown endpoint; see POST /v1/predict, GET /v1/status")
                except _Refused as exc:
                    server.rejected += 1
                    self._reply(exc.status, {"error": str(exc)})
                except InstallError as exc:
                    server.rejected += 1
                    self._reply(503, {"error": str(exc)})
                except EdgekitError as exc:  # DataError and the like: the request was wrong
                    server.rejected += 1
                    self._reply(400, {"error": str(exc)})
                except ValueError as exc:  # a malformed Content-Length, a ragged array
                    server.rejected += 1
                    self._reply(400, {"error": f"bad request: {exc}"})
                else:
                    self._reply(200, doc)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("inference %s: " + format, self.client_address[0], *args)

        return Handler
