"""Local inference over HTTP (agent/serve.py): real agent, real model, real sockets."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgekit.agent import Agent
from edgekit.agent.serve import InferenceServer
from edgekit.agent_config import AgentConfig
from edgekit.errors import ConfigError
from helpers import free_port


def call(
    url: str, body: bytes | None = None, content_type: str = "application/json", token: str = ""
) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    request.add_header("Content-Type", content_type)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def served(config_path: Path, bundles) -> Iterator[tuple[Agent, str]]:
    agent = Agent.from_config(config_path, background=False)
    agent.install(bundles.v2)  # int8: the server's float inputs are quantized by the agent
    server = InferenceServer(agent, "127.0.0.1", 0).start()
    yield agent, server.url
    server.stop()
    agent.close()


def test_predict_over_http_matches_the_embedded_call(served, models):
    agent, url = served
    x = models.x_test[:1]
    status, doc = call(f"{url}/v1/predict", json.dumps({"inputs": x.tolist()}).encode())
    assert status == 200, doc
    assert doc["bundle"] == {"name": "digits", "version": "2.0.0"}
    ((name, out),) = doc["outputs"].items()
    expected = agent.predict(x, as_dict=True)[name]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6)

    buffer = io.BytesIO()
    np.save(buffer, x)
    status, npy = call(f"{url}/v1/predict", buffer.getvalue(), content_type="application/x-npy")
    assert status == 200 and npy["outputs"] == doc["outputs"]


def test_instances_run_once_each_and_are_counted_like_embedded_calls(served, models):
    agent, url = served
    before = agent.status()
    xs = models.x_test[:5]
    status, doc = call(f"{url}/v1/predict", json.dumps({"instances": xs.tolist()}).encode())
    assert status == 200 and len(doc["predictions"]) == 5
    labels = [int(np.argmax(next(iter(p.values())))) for p in doc["predictions"]]
    assert labels == [int(np.argmax(agent.predict(x[None])[0])) for x in xs]
    record = agent.flush_telemetry()
    assert record is not None and record.count >= 10  # 5 over HTTP + 5 embedded above
    assert before.serving


@pytest.mark.parametrize(
    ("body", "content_type", "code", "words"),
    [
        (b"{not json", "application/json", 400, "not JSON"),
        (b'{"inputs": [1, 2, 3]}', "application/json", 400, "shape"),
        (b'{"inputs": [[1], [2, 3]]}', "application/json", 400, "bad request"),
        (b'{"inputs": 1, "instances": []}', "application/json", 400, "either"),
        (b'{"instances": 5}', "application/json", 400, "list"),
        (b"\x93NUMPY garbage", "application/x-npy", 400, ".npy"),
    ],
)
def test_bad_requests_get_one_line_errors_and_the_server_keeps_serving(
    served, models, body, content_type, code, words
):
    _, url = served
    status, doc = call(f"{url}/v1/predict", body, content_type)
    assert status == code and words in doc["error"] and "\n" not in doc["error"]
    status, doc = call(f"{url}/v1/predict", json.dumps({"inputs": models.x_test[:1].tolist()}).encode())
    assert status == 200


def test_status_drift_and_unknown_paths(served):
    _, url = served
    status, doc = call(f"{url}/v1/status")
    assert status == 200 and doc["version"] == "2.0.0"
    status, doc = call(f"{url}/v1/drift")
    assert status == 200 and "drifted" in doc
    status, doc = call(f"{url}/v1/nothing")
    assert status == 404 and "/v1/predict" in doc["error"]


def test_no_model_installed_is_a_503_naming_the_fix(config_path):
    agent = Agent.from_config(config_path, background=False)
    server = InferenceServer(agent, "127.0.0.1", 0).start()
    try:
        status, doc = call(f"{server.url}/v1/predict", b'{"inputs": [0]}')
        assert status == 503 and "edgekit-agent install" in doc["error"]
    finally:
        server.stop()
        agent.close()


def test_listening_beyond_loopback_needs_a_token_and_the_token_is_checked(served, config_path, models):
    agent, _ = served
    with pytest.raises(ConfigError, match="serve.token"):
        InferenceServer(agent, "0.0.0.0", 0)
    server = InferenceServer(agent, "0.0.0.0", 0, token="s3cret").start()
    url = server.url.replace("0.0.0.0", "127.0.0.1")
    body = json.dumps({"inputs": models.x_test[:1].tolist()}).encode()
    try:
        assert call(f"{url}/v1/predict", body)[0] == 401
        assert call(f"{url}/v1/predict", body, token="wrong")[0] == 401
        assert call(f"{url}/v1/predict", body, token="s3cret")[0] == 200
    finally:
        server.stop()


def test_bad_listen_address_names_the_key_and_the_file(make_config):
    config = make_config("bad", serve_listen="8500")
    with pytest.raises(ConfigError, match=r"bad\.toml: serve\.listen must be HOST:PORT"):
        AgentConfig.load(config)


def test_agent_run_serves_inference_when_configured(make_config, bundles, models):
    port = free_port()
    config = make_config("served", serve_listen=f"127.0.0.1:{port}")
    cli = [sys.executable, "-m", "edgekit.agent.cli"]
    assert (
        subprocess.run([*cli, "install", str(bundles.v1), "--config", str(config)], check=False).returncode
        == 0
    )
    process = subprocess.Popen([*cli, "run", "--config", str(config)], stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    try:
        for line in process.stderr:  # the server is up before the daemon logs this
            if "serving inference" in line:
                break
        status, doc = call(
            f"http://127.0.0.1:{port}/v1/predict", json.dumps({"inputs": models.x_test[:1].tolist()}).encode()
        )
        assert status == 200 and doc["bundle"]["version"] == "1.0.0"
    finally:
        process.send_signal(signal.SIGTERM)
        rest = process.stderr.read()
        assert process.wait(timeout=60) == 0, rest


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _read_to_eof(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (it must, within the timeout)."""
    sock.settimeout(30)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_idle_and_slow_drip_connections_do_not_starve_predict_and_memory_stays_bounded(
    config_path, bundles, models
):
    """200 idle sockets and 40 slowloris bodies (a byte every 50 ms of a declared 200 kB) hold
    connections open; meanwhile embedded predict() and a well-behaved HTTP client are served,
    the process's RSS stays bounded, and every attacker is closed after the request timeout."""
    agent = Agent.from_config(config_path, background=False)
    agent.install(bundles.v2)
    server = InferenceServer(agent, "127.0.0.1", 0, workers=2, request_timeout=6.0).start()
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"inputs": models.x_test[:1].tolist()}).encode()
    expected = agent.predict(models.x_test[:1])
    rss_before = _rss()
    idle = [socket.create_connection((host, int(port))) for _ in range(200)]
    drips = [socket.create_connection((host, int(port))) for _ in range(40)]
    for sock in drips:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n")
    stop = threading.Event()

    def drip() -> None:
        while not stop.wait(0.05):
            for sock in drips:
                with contextlib.suppress(OSError):
                    sock.send(b"[")

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        peak = 0
        for _ in range(20):
            np.testing.assert_array_equal(agent.predict(models.x_test[:1])[0], expected[0])
            status, doc = call(f"{server.url}/v1/predict", body)
            assert status == 200, doc
            peak = max(peak, _rss())
        assert server.open_connections >= 240  # the attackers were connected all along
        assert peak - rss_before < 48 * 1024 * 1024, (rss_before, peak)
        for sock in idle:  # closed by the server, without a reply: they never sent a request
            assert _read_to_eof(sock) == b""
        stop.set()
        for sock in drips:
            assert _read_to_eof(sock).startswith(b"HTTP/1.1 408 ")
        assert server.timed_out == 240 and server.open_connections == 0
        assert call(f"{server.url}/v1/predict", body)[0] == 200
    finally:
        stop.set()
        dripper.join()
        for sock in idle + drips:
            sock.close()
        server.stop()
        agent.close()


def test_connections_bodies_and_the_body_budget_are_limited(served, models):
    agent, _ = served
    server = InferenceServer(
        agent, "127.0.0.1", 0, max_connections=3, max_body=100_000, body_budget=150_000
    ).start()
    host, port = server.url.removeprefix("http://").split(":")
    open_ = [socket.create_connection((host, int(port))) for _ in range(2)]
    try:
        head = "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n"
        too_big = socket.create_connection((host, int(port)))
        too_big.sendall(head.format(100_001).encode())  # refused before a byte of the body is read
        assert _read_to_eof(too_big).startswith(b"HTTP/1.1 413 ")
        open_[0].sendall(head.format(100_000).encode() + b"[")  # reserves 100 kB of the 150 kB
        open_[1].sendall(head.format(60_000).encode())
        reply = _read_to_eof(open_[1])
        assert reply.startswith(b"HTTP/1.1 503 ") and b"try again" in reply
        extra = [socket.create_connection((host, int(port))) for _ in range(3)]
        replies = [_read_to_eof(extra[-1])]
        assert replies[0].startswith(b"HTTP/1.1 503 ") and b"too many connections" in replies[0]
        assert server.turned_away == 1
        chunked = extra[0]
        chunked.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert _read_to_eof(chunked).startswith(b"HTTP/1.1 411 ")
        for sock in extra:
            sock.close()
        body = json.dumps({"inputs": models.x_test[:1].tolist()}).encode()
        assert call(f"{server.url}/v1/predict", body)[0] == 200  # still serving
    finally:
        for sock in open_:
            sock.close()
        server.stop()
