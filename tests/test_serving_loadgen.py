"""The serving benchmark's load generator against a scripted HTTP server: it counts
answers and failures correctly and reports its own and the server's CPU time."""

from __future__ import annotations

import asyncio
import os

from bench.loadgen import load, process_cpu_s


async def run_against_scripted_server(statuses: dict[str, int]) -> dict:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request_line = await reader.readline()
            if not request_line:
                break
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            path = request_line.split()[1].decode()
            reply = b'{"echo": %d}' % len(body)
            writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (statuses[path], len(reply), reply))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        return await load(
            f"http://127.0.0.1:{port}", lambda i, n: ("POST", "/bad" if n % 4 == 3 else "/ok", b"x" * i, "text/plain"),
            clients=3, duration_s=0.3, server_pid=os.getpid(),
        )


def test_load_counts_answers_failures_and_cpu() -> None:
    result = asyncio.run(run_against_scripted_server({"/ok": 200, "/bad": 500}))
    assert result["clients"] == 3 and result["requests"] > 0
    # every client sends ok, ok, ok, bad, ...: a quarter of the requests fail (rounded per client)
    assert result["requests"] / 3 - 3 <= result["failed"] <= result["requests"] / 3 + 3
    assert result["failures_sample"][0].startswith("500: ")
    assert result["p50_ms"] > 0 and result["p99_ms"] >= result["p50_ms"]
    assert result["client_cpu_ms_per_request"] > 0 and 0 < result["client_cpu_util"] <= 2.5
    assert result["server_cpu_ms_per_request"] > 0  # the server is this process here


def test_process_cpu_counts_this_process_both_ways() -> None:
    before_self, before_proc = process_cpu_s(), process_cpu_s(os.getpid())
    sum(i * i for i in range(2_000_000))
    spent_self, spent_proc = process_cpu_s() - before_self, process_cpu_s(os.getpid()) - before_proc
    assert spent_self > 0.01 and spent_proc > 0.0
    assert abs(spent_self - spent_proc) < 0.05 + 0.5 * spent_self  # /proc ticks are 10 ms coarse
