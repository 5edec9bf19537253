"""Serving benchmark: latency and throughput of the HTTP API under concurrent load.

    python -m bench.serving --quick      # under 5 minutes
    python -m bench.serving              # 100k items, longer runs

Builds a throwaway store (a model trained on the bundled digits, an index of random
unit vectors: 100k items, 20k with --quick; the encoder's weights are trained only
briefly, as only its forward cost matters here), starts ``lookalike serve`` in a
subprocess on 127.0.0.1, and drives it from this process with asyncio clients at 1,
8, 32 and 64 concurrent requests, for vector and image queries, each level bounded in
time. Baselines are measured in the same run: an in-process ``ItemIndex.search`` of
the same index (vector overhead) and the same server with micro-batching off
(``max_batch=1``, one forward per image); the gain of running a lone query on the
event loop is shown by the batched server with that off, at one client
(``p50_ms_at_1_without_inline``). A hot swap is done under load and every
failed request counted. Every run also reports the CPU time the server and the load
generator (``bench.loadgen``) spent per request, and ``in_process_costs_ms`` what a
forward, a search and a decode cost here, which bound what batching can gain. Writes
bench/results/serving.json and serving.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa

from bench.loadgen import DESCRIPTION as LOAD_GENERATOR
from bench.loadgen import load

log = logging.getLogger("bench.serving")

RESULTS = Path(__file__).resolve().parent / "results" / "serving.json"
HOST = "127.0.0.1"
K = 10
LEVELS = (1, 8, 32, 64)
# The two servers image_batching_speedup compares: the same code, micro-batching on and off.
BATCHED = {"max_batch": 64, "max_embed_batch": 16, "batch_wait_ms": 2.0, "inline_max_ms": 2.0}
ONE_FORWARD_PER_QUERY = {"max_batch": 1, "max_embed_batch": 1, "batch_wait_ms": 0.0, "inline_max_ms": 2.0}
# The batched server with every query handed to a batcher's thread: what running a lone
# query on the event loop saves at one client (p50_ms_at_1_without_inline).
NO_INLINE = dict(BATCHED, inline_max_ms=0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def make_store(root: Path, items: int, preset: str, overrides: list[str], seed: int = 0) -> tuple[list[Path], str]:
    """A store with a model trained on digits and a random-vector index; returns query images and version."""
    from lookalike.model.config import apply_overrides, get_config
    from lookalike.model.datasets import write_digits_corpus
    from lookalike.model.store import Store
    from lookalike.model.train import train_and_evaluate

    write_digits_corpus(root / "corpus", limit=300)
    started = time.perf_counter()
    train_and_evaluate(apply_overrides(get_config(preset), overrides), root)
    log.info("trained the %s model in %.1fs", preset, time.perf_counter() - started)
    store = Store.at(root)
    version = publish_random(store, items, seed)
    images = sorted((root / "corpus").rglob("*.png"))
    return images, version


def publish_random(store, items: int, seed: int) -> str:
    from lookalike.index.builder import build_and_publish
    from lookalike.model.artifact import read_model_meta

    meta = read_model_meta(store.require_model())
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((items, int(meta["embed_dim"]))).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    table = pa.table({
        "id": [f"r/{i:07d}" for i in range(items)],
        "kind": ["image"] * items,
        "group": [f"g{i % 1000}" for i in range(items)],
    })
    started = time.perf_counter()
    version = build_and_publish(store, emb, table, model_version=meta["version"])
    log.info("built and published %d-item index %s in %.1fs", items, version, time.perf_counter() - started)
    return version


class Server:
    """``lookalike serve`` in a subprocess (bound to 127.0.0.1)."""

    def __init__(self, workdir: Path, max_batch: int, max_embed_batch: int, batch_wait_ms: float = 2.0,
                 inline_max_ms: float = 2.0, watch_interval_s: float = 0.5):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        code = (
            "import logging, sys; logging.basicConfig(level=logging.WARNING);"
            "from lookalike.serving.server import serve;"
            f"serve({str(workdir)!r}, host={HOST!r}, port={self.port}, log_level='warning', "
            f"max_batch={max_batch}, max_embed_batch={max_embed_batch}, batch_wait_ms={batch_wait_ms}, "
            f"inline_max_ms={inline_max_ms}, "
            f"watch_interval_s={watch_interval_s})"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("server did not become ready in 180 s")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def vector_request(vectors: np.ndarray):
    payloads = [json.dumps({"vector": v.tolist(), "k": K}).encode() for v in vectors]

    def request(i: int, n: int) -> tuple[str, str, bytes, str]:
        return "POST", "/v1/search/vector", payloads[(i * 7919 + n) % len(payloads)], "application/json"

    return request


def image_request(images: list[bytes]):
    def request(i: int, n: int) -> tuple[str, str, bytes, str]:
        return "POST", f"/v1/search/image?k={K}", images[(i * 7919 + n) % len(images)], "image/png"

    return request


def in_process_p50_ms(workdir: Path, vectors: np.ndarray, repeats: int) -> float:
    from lookalike.index.searcher import ItemIndex
    from lookalike.model.store import Store

    index = ItemIndex.load(Store.at(workdir).require_current_index())
    times = []
    for i in range(repeats):
        q = vectors[i % len(vectors)]
        started = time.perf_counter()
        index.search(q[None, :], K)
        times.append(time.perf_counter() - started)
    return float(np.percentile(np.asarray(times) * 1000, 50))


def in_process_costs_ms(workdir: Path, images: list[bytes], vectors: np.ndarray) -> dict:
    """What batching can amortise, measured in this process: one forward of N images (N in the
    encoder's batch buckets up to 64), one search of N queries, and decoding one upload."""
    from lookalike.index.searcher import ItemIndex
    from lookalike.model.artifact import load_encoder
    from lookalike.model.store import Store

    store = Store.at(workdir)
    index = ItemIndex.load(store.require_current_index())
    encoder = load_encoder(store.require_model(index.model_version))

    def best_of(fn, repeats: int = 30) -> float:
        fn()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return round(float(np.percentile(np.asarray(times) * 1000, 25)), 4)  # a busy machine only adds time

    pixels = np.stack([encoder.preprocess(images[i % len(images)]) for i in range(64)])
    return {
        "decode_per_image": best_of(lambda: encoder.preprocess(images[0]), 200),
        "forward": {n: best_of(lambda n=n: encoder.embed(pixels[:n])) for n in (1, 4, 16, 64)},
        "search": {n: best_of(lambda n=n: index.search(vectors[:n], K)) for n in (1, 16, 64)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20k items, 3 s per level (under 5 minutes)")
    parser.add_argument("--items", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="duration of each load level")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--preset", default="digits", help="model preset (the encoder whose forward is batched)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="model config override, e.g. --set conv_widths=64,128,128 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(force=True, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "httpcore", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    items = args.items or (20_000 if args.quick else 100_000)
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    preset = args.preset
    overrides = ["num_steps=60", "eval_every_steps=60", *args.overrides]  # weights' quality does not matter here
    bench_started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="lookalike-bench-serving-"))
    result: dict = {"items": items, "seconds_per_level": seconds, "model_preset": preset, "model_overrides": overrides, "k": K, "cpu_count": os.cpu_count(),
                    "load_generator": LOAD_GENERATOR}
    try:
        image_paths, _ = make_store(workdir, items, preset, overrides)
        images = [p.read_bytes() for p in image_paths[:256]]
        from lookalike.model.artifact import read_model_meta
        from lookalike.model.store import Store

        dim = int(read_model_meta(Store.at(workdir).require_model())["embed_dim"])
        rng = np.random.default_rng(1)
        vectors = rng.standard_normal((512, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        result["in_process_search_p50_ms"] = round(in_process_p50_ms(workdir, vectors, 2000), 4)
        result["in_process_costs_ms"] = in_process_costs_ms(workdir, images, vectors)
        log.info("in-process costs (ms): %s", result["in_process_costs_ms"])

        runs: dict = {"vector": {}, "image": {}, "image_unbatched": {}, "vector_no_inline": {}, "image_no_inline": {}}
        result["servers"] = {  # how each side of image_batching_speedup is configured (the same server otherwise)
            "batched": dict(BATCHED),
            "one_forward_per_query": dict(ONE_FORWARD_PER_QUERY),
            "no_inline": dict(NO_INLINE),
            "image_path": "decode, forward and search of an image query run in the image batcher's worker thread, "
                          "up to max_embed_batch queries per forward and ScaNN call (1 for one_forward_per_query)",
        }
        with Server(workdir, **BATCHED) as server:
            for kind, make in (("vector", vector_request(vectors)), ("image", image_request(images))):
                asyncio.run(load(server.url, make, 4, 1.0))  # warm-up (compiles batch buckets)
                for clients in LEVELS:
                    runs[kind][clients] = asyncio.run(load(server.url, make, clients, seconds, server.proc.pid))
                    log.info("%s x%d: %s", kind, clients, runs[kind][clients])
            result["swap"] = swap_under_load(server, workdir, items, vectors, images, seconds)
            log.info("swap: %s", result["swap"])
        with Server(workdir, **ONE_FORWARD_PER_QUERY) as server:
            asyncio.run(load(server.url, image_request(images), 4, 1.0))
            runs["image_unbatched"][32] = asyncio.run(load(server.url, image_request(images), 32, seconds, server.proc.pid))
            log.info("image unbatched x32: %s", runs["image_unbatched"][32])
        with Server(workdir, **NO_INLINE) as server:
            for kind, make in (("vector", vector_request(vectors)), ("image", image_request(images))):
                asyncio.run(load(server.url, make, 4, 1.0))
                runs[f"{kind}_no_inline"][1] = asyncio.run(load(server.url, make, 1, seconds, server.proc.pid))
                log.info("%s x1, every query in a batcher's thread: %s", kind, runs[f"{kind}_no_inline"][1])
        result["runs"] = runs
        v1 = runs["vector"][1]["p50_ms"]
        result["vector_p50_ms_at_1"] = v1
        result["vector_p50_overhead_ms"] = round(v1 - result["in_process_search_p50_ms"], 3)
        result["p50_ms_at_1"] = {kind: runs[kind][1]["p50_ms"] for kind in ("vector", "image")}
        result["p50_ms_at_1_without_inline"] = {kind: runs[f"{kind}_no_inline"][1]["p50_ms"] for kind in ("vector", "image")}
        result["image_batching_speedup"] = round(
            runs["image"][32]["throughput_rps"] / max(runs["image_unbatched"][32]["throughput_rps"], 1e-9), 2
        )
        result["image_batching_cpu_ratio"] = round(  # server CPU per request, unbatched / batched (robust to a busy machine)
            runs["image_unbatched"][32]["server_cpu_ms_per_request"] / max(runs["image"][32]["server_cpu_ms_per_request"], 1e-9), 2
        )
        result["max_client_cpu_util"] = max(r["client_cpu_util"] for kind in runs.values() for r in kind.values())
        result["failed_requests_during_swap"] = result["swap"]["failed"]
        result["p99_ms_at_32"] = {"vector": runs["vector"][32]["p99_ms"], "image": runs["image"][32]["p99_ms"]}
        result["failed_requests_total"] = sum(r["failed"] for kind in runs.values() for r in kind.values())
        result["targets"] = {
            "vector_p50_overhead_ms <= 1": result["vector_p50_overhead_ms"] <= 1.0,
            "image_batching_speedup >= 3": result["image_batching_speedup"] >= 3.0,
            "failed_requests_during_swap == 0": result["failed_requests_during_swap"] == 0,
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["bench_seconds"] = round(time.perf_counter() - bench_started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if "runs" in result:
        plot(result, args.out.with_suffix(".png"))
    summary = {k: result[k] for k in ("vector_p50_overhead_ms", "p50_ms_at_1", "p50_ms_at_1_without_inline", "image_batching_speedup", "image_batching_cpu_ratio",
                                       "max_client_cpu_util", "failed_requests_during_swap", "p99_ms_at_32")}
    summary["image_x32"] = {side: {k: runs[32][k] for k in ("throughput_rps", "server_cpu_ms_per_request", "server_cpu_util")}
                            for side, runs in (("batched", result["runs"]["image"]), ("one_forward_per_query", result["runs"]["image_unbatched"]))}
    summary["servers"] = {k: result["servers"][k] for k in ("batched", "one_forward_per_query")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return 0


def plot(result: dict, path: Path) -> None:
    """Throughput and p50/p99 latency against concurrent clients, vector and image queries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, style in (("vector", "o-"), ("image", "s-")):
        runs = result["runs"][kind]
        clients = sorted(runs, key=int)  # int keys, or str keys when read back from JSON
        x = [int(c) for c in clients]
        left.plot(x, [runs[c]["throughput_rps"] for c in clients], style, label=f"{kind} (batched)")
        right.plot(x, [runs[c]["p50_ms"] for c in clients], style, label=f"{kind} p50")
        right.plot(x, [runs[c]["p99_ms"] for c in clients], style, alpha=0.5, label=f"{kind} p99")
    for c, run in result["runs"]["image_unbatched"].items():
        left.plot([int(c)], [run["throughput_rps"]], "kx", markersize=9, label="image, one forward per query")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="requests / s", title="throughput")
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms", title="latency")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"lookalike serve, {result['items']} items, {result['cpu_count']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def swap_under_load(server: Server, workdir: Path, items: int, vectors: np.ndarray, images: list[bytes], seconds: float) -> dict:
    """Publish a new index while 16 clients (vector and image) query; count failures."""
    from lookalike.model.store import Store

    before = httpx.get(f"{server.url}/v1/info").json()["index_version"]
    published: dict = {}

    def publish() -> None:
        time.sleep(seconds / 3)
        published["version"] = publish_random(Store.at(workdir), items, seed=7)
        published["at"] = time.perf_counter()

    vec, img = vector_request(vectors), image_request(images)

    def mixed(i: int, n: int) -> tuple[str, str, bytes, str]:
        return (vec if i % 2 else img)(i, n)

    thread = threading.Thread(target=publish)
    thread.start()
    # Keep the load on until the new version has been served for a while (bounded).
    deadline = time.monotonic() + max(60.0, 6 * seconds)
    totals = {"requests": 0, "failed": 0, "failures_sample": []}
    while time.monotonic() < deadline:
        r = asyncio.run(load(server.url, mixed, 16, seconds))
        totals["requests"] += r["requests"]
        totals["failed"] += r["failed"]
        totals["failures_sample"] += r["failures_sample"]
        after = httpx.get(f"{server.url}/v1/info").json()
        if not thread.is_alive() and after["index_version"] == published.get("version"):
            r = asyncio.run(load(server.url, mixed, 16, seconds / 2))  # and keep going after the swap
            totals["requests"] += r["requests"]
            totals["failed"] += r["failed"]
            break
    thread.join()
    after = httpx.get(f"{server.url}/v1/info").json()
    return dict(totals, before=before, after=after["index_version"], swapped=after["index_version"] == published.get("version"),
                last_reload_error=after["last_reload_error"])


if __name__ == "__main__":
    sys.exit(main())
