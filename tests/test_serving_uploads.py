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
def one_slot_server(backend, wait_s: float, idle_s: float | None = None) -> Iterator[httpx.Client]:
    app = create_app(lambda: backend, max_large_uploads=1, large_upload_wait_s=wait_s)
    if idle_s is not None:
        app.state.large_upload_slots.idle_timeout_s = idle_s
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
    ([(b"transfer-encoding", b"chunked")], False),  # size unknown: it waits once over the threshold
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
        # The wait is in each request's latency, as its client saw it, and in the stage upload_wait.
        samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in http.get("/metrics").text.splitlines()
                   if not line.startswith("#")}
        latency = 'lookalike_request_seconds_bucket{endpoint="/v1/search/image",le="%s"}'
        assert samples[latency % "+Inf"] - samples[latency % "0.2"] == 2  # the half-sent upload and the one that waited
        assert samples['lookalike_stage_seconds_sum{stage="upload_wait"}'] >= 0.4
        assert samples['lookalike_stage_seconds_count{stage="upload_wait"}'] == 2


def test_an_idle_upload_holding_the_slot_is_a_408_and_frees_it(backend, large_png):
    """Headers sent and then nothing: without a deadline a few such connections would hold
    every slot for ever. The body must keep arriving: a gap of ``idle_timeout_s`` ends it."""
    with one_slot_server(backend, wait_s=30.0, idle_s=1.0) as http:
        address = urlsplit(str(http.base_url))
        with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
            sock.sendall(f"POST {IMAGE_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         f"Content-Length: {len(large_png)}\r\n\r\n".encode() + large_png[:1000])
            started = time.monotonic()
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 408 ") and b"nothing came for 1 s" in answer, answer[:300]
            assert time.monotonic() - started < 10
        again = http.post(IMAGE_PATH, content=large_png, headers={"content-type": "image/png"})
        assert again.status_code == 200, again.text  # the slot is free


def test_a_trickling_upload_holding_the_slot_is_a_408_and_frees_it(backend, large_png):
    """A body that keeps arriving, but a few bytes at a time, would hold its slot for hours:
    once ``idle_timeout_s`` has passed it must have kept the least rate."""
    with one_slot_server(backend, wait_s=30.0, idle_s=0.5) as http:
        address = urlsplit(str(http.base_url))
        with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
            sock.sendall(f"POST {IMAGE_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         f"Content-Length: {len(large_png)}\r\n\r\n".encode())
            started, answer = time.monotonic(), b""
            sock.settimeout(0.1)
            for at in range(0, len(large_png), 30):  # 30 bytes every 0.1 s: 300 B/s, never idle 0.5 s
                if time.monotonic() - started > 10:
                    break
                try:
                    sock.sendall(large_png[at:at + 30])
                    answer = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:  # reset after the answer: read what came
                    break
                if answer:
                    break
            assert answer.startswith(b"HTTP/1.1 408 ") and b"arrives too slowly" in answer, answer[:300]
            assert b"under the 4 KiB/s an upload over 1 MiB must keep" in answer, answer[:400]
        again = http.post(IMAGE_PATH, content=large_png, headers={"content-type": "image/png"})
        assert again.status_code == 200, again.text  # the slot is free


def test_a_small_chunked_body_never_waits(backend, large_png):
    """A body of unknown size (chunked, as a streaming client sends it) waits for a slot only
    once it has grown large; a small one is answered while every slot is held."""
    vector = json.dumps({"vector": [0.5] * backend.index.embed_dim, "k": 3}).encode()
    with one_slot_server(backend, wait_s=30.0) as http:
        with half_sent_upload(str(http.base_url), large_png) as finish:
            small = http.post("/v1/search/vector", content=iter([vector]), headers={"content-type": "application/json"})
            assert small.status_code == 200, small.text
            finish()


def test_a_client_that_sends_its_whole_body_before_reading_gets_the_503(backend, large_png):
    """``http.client`` writes the whole body before it reads: the refused body (9 MB, more than
    the sockets' buffers hold) is read and dropped, so it gets the 503 and Retry-After rather
    than a reset connection."""
    from http.client import HTTPConnection

    pixels = np.random.default_rng(1).integers(0, 256, (1700, 1800, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    huge_png = out.getvalue()
    assert 8 << 20 < len(huge_png) < 10 << 20, len(huge_png)

    with one_slot_server(backend, wait_s=0.5) as http:
        with half_sent_upload(str(http.base_url), large_png) as finish:
            address = urlsplit(str(http.base_url))
            connection = HTTPConnection(address.hostname, address.port, timeout=30)
            try:
                connection.request("POST", IMAGE_PATH, body=huge_png, headers={"Content-Type": "image/png"})
                response = connection.getresponse()
                assert response.status == 503 and response.getheader("Retry-After")
                assert b"busy taking in 1 other large uploads" in response.read()
            finally:
                connection.close()
            finish()


def test_slots_follow_the_event_loop_that_serves_the_app():
    """An app served by one event loop and then another (tests, embedding code) gets fresh
    slots on the second, rather than a semaphore bound to the first loop."""
    import asyncio

    from lookalike.serving.metrics import ServingMetrics
    from lookalike.serving.uploads import LargeBodySlots

    async def slow_app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await asyncio.sleep(0.2)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    slots = LargeBodySlots(slow_app, count=1, max_body_bytes=10 << 20, metrics=ServingMetrics(), wait_timeout_s=5.0)
    scope = {"type": "http", "method": "POST", "path": "/x", "headers": [(b"content-length", b"2000000")]}

    async def request() -> int:
        status = []

        async def receive():
            return {"type": "http.request", "body": b"x" * 2_000_000, "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await slots(dict(scope), receive, send)
        return status[0]

    async def round_of_two() -> list[int]:
        return list(await asyncio.gather(request(), request()))

    assert asyncio.run(round_of_two()) == [204, 204]  # the second waited for the first's slot
    assert asyncio.run(round_of_two()) == [204, 204]
