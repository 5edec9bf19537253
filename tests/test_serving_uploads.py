"""Large uploads are taken in a bounded number at a time (``serving/uploads.py``), on the real
server on 127.0.0.1 with raw sockets holding an upload half sent."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from lookalike.serving.app import create_app
from lookalike.serving.server import serve_in_thread
from lookalike.serving.uploads import LARGE_BODY_BYTES, is_large_body

IMAGE_PATH = "/v1/search/image?k=3"


@pytest.fixture(scope="module")
def large_png() -> bytes:
    """A real PNG of noise, over LARGE_BODY_BYTES."""
    pixels = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    assert LARGE_BODY_BYTES < len(out.getvalue()) < 10 << 20
    return out.getvalue()


@contextmanager
def one_slot_server(backend, wait_s: float) -> Iterator[httpx.Client]:
    app = create_app(lambda: backend, max_large_uploads=1, large_upload_wait_s=wait_s)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


@contextmanager
def half_sent_upload(url: str, body: bytes) -> Iterator[callable]:
    """A raw connection that declares ``body``, sends a tenth of it and waits; yields a function
    that sends the rest and returns the response's status line and body."""
    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(f"POST {IMAGE_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 10])

        def finish() -> tuple[str, bytes]:
            sock.sendall(body[len(body) // 10:])
            response = b""
            while b"\r\n\r\n" not in response or len(response.split(b"\r\n\r\n", 1)[1]) < _length(response):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                response += chunk
            head, _, payload = response.partition(b"\r\n\r\n")
            return head.split(b"\r\n", 1)[0].decode(), payload

        time.sleep(0.3)  # the server has taken the slot and waits for the rest of the body
        yield finish


def _length(response: bytes) -> int:
    for line in response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def requests_counted(http: httpx.Client, status: int) -> float:
    label = f'lookalike_requests_total{{endpoint="/v1/search/image",method="POST",status="{status}"}}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in http.get("/metrics").text.splitlines() if line.startswith(label))


@pytest.mark.parametrize("headers, large", [
    ([(b"content-length", str(LARGE_BODY_BYTES).encode())], False),  # at the threshold: small
    ([(b"content-length", str(LARGE_BODY_BYTES + 1).encode())], True),
    ([(b"content-length", b"999999999")], False),  # over the body limit: a 413 before anything is read
    ([(b"transfer-encoding", b"chunked")], True),  # size unknown until it has arrived
    ([], False),  # no body
])
def test_which_bodies_are_large(headers, large):
    assert is_large_body(headers, max_body_bytes=10 << 20) is large


def test_a_large_upload_waits_for_a_slot_and_small_queries_never_do(backend, indexed_store, large_png):
    """With one slot held by an upload half sent, a second large upload is a 503 with
    Retry-After after the wait, counted in /metrics, while a small image query is answered at
    once; the held upload, finished, is answered, and then the slot is free again."""
    small_png = (indexed_store.corpus_dir / "3/digit_0003.png").read_bytes()
    with one_slot_server(backend, wait_s=1.0) as http:
        refused_before = requests_counted(http, 503)
        with half_sent_upload(str(http.base_url), large_png) as finish:
            started = time.monotonic()
            small = http.post(IMAGE_PATH, content=small_png, headers={"content-type": "image/png"})
            assert small.status_code == 200 and time.monotonic() - started < 1.0
            refused = http.post(IMAGE_PATH, content=large_png, headers={"content-type": "image/png"})
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            assert "busy taking in 1 other large uploads" in refused.json()["detail"]
            status, payload = finish()
        assert status.endswith("200 OK") and len(json.loads(payload)["results"]) == 3
        assert requests_counted(http, 503) == refused_before + 1
        again = http.post(IMAGE_PATH, content=large_png, headers={"content-type": "image/png"})
        assert again.status_code == 200, again.text
        assert http.get("/v1/info").json()["max_large_uploads"] == 1


def test_a_waiting_upload_gets_the_slot_when_it_frees(backend, large_png):
    with one_slot_server(backend, wait_s=30.0) as http:
        answers: list[httpx.Response] = []
        with half_sent_upload(str(http.base_url), large_png) as finish:
            waiting = threading.Thread(target=lambda: answers.append(
                http.post(IMAGE_PATH, content=large_png, headers={"content-type": "image/png"})))
            waiting.start()
            time.sleep(0.5)
            assert not answers  # still waiting for the slot
            status, _ = finish()
        waiting.join(60)
        assert status.endswith("200 OK") and answers and answers[0].status_code == 200, answers
