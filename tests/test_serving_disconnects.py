"""A client that disconnects mid-request (conftest's real server on 127.0.0.1, raw sockets): 499
in /metrics, no ERROR and no traceback in the log, and the server answers the next request."""

from __future__ import annotations

import json
import logging
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from lookalike.model.store import Store

QUERY_ID = "3/digit_0003.png"


def count(http: httpx.Client, endpoint: str, status: int) -> float:
    """``lookalike_requests_total`` of ``endpoint`` (POST) with ``status``, 0 when absent."""
    label = f'lookalike_requests_total{{endpoint="{endpoint}",method="POST",status="{status}"}}'
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(label):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def send_part_and_hang_up(url: str, path: str, content_type: str, body: bytes) -> None:
    """Declare the whole ``body``, send half of it, then close the connection."""
    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
        time.sleep(0.2)


@pytest.mark.parametrize("what", ["raw_image", "multipart_image", "vector", "batch"])
def test_a_client_that_hangs_up_mid_body_is_a_499_not_a_server_error(http, backend, indexed_store: Store, caplog, what):
    png = (indexed_store.corpus_dir / QUERY_ID).read_bytes()
    vector = json.dumps({"vector": [0.5] * backend.index.embed_dim, "k": 3}).encode()
    path, content_type, body = {
        "raw_image": ("/v1/search/image?k=3", "image/png", png),
        "multipart_image": ("/v1/search/image?k=3", "multipart/form-data; boundary=B",
                            b'--B\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n\r\n' + png + b"\r\n--B--\r\n"),
        "vector": ("/v1/search/vector", "application/json", vector),
        "batch": ("/v1/search/batch", "application/json", json.dumps({"queries": [{"id": QUERY_ID}] * 50}).encode()),
    }[what]
    endpoint = path.split("?")[0]
    before_499, before_500 = count(http, endpoint, 499), count(http, endpoint, 500)
    with caplog.at_level(logging.DEBUG):
        send_part_and_hang_up(str(http.base_url), path, content_type, body)
        deadline = time.monotonic() + 30
        while count(http, endpoint, 499) == before_499 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert count(http, endpoint, 499) == before_499 + 1
    assert count(http, endpoint, 500) == before_500
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert any("the client disconnected before its request body arrived" in r.getMessage() for r in caplog.records)
    answered = http.post(path, content=body, headers={"content-type": content_type})
    assert answered.status_code == 200, answered.text
