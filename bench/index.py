"""Benchmark: our autotuned ScaNN index against FAISS, hnswlib and exact brute force.

    python -m bench.index --quick     # 100k x 128 clustered vectors, < 5 minutes
    python -m bench.index             # 1M x 128 clustered vectors

Same data, same run. For every method a parameter sweep gives a recall@10-vs-QPS curve
on held-out queries (single-thread batched and 2-thread batched); at recall 0.90 and 0.95
the fastest configuration reaching it is compared, after the contenders (each method's
fastest and cheapest settings reaching the target) are timed again in five rounds
alternating between methods, each taking the median. Also: build time (2 threads), load
time, bytes per vector, and exact brute force (ScaNN brute force on a 20k corpus) against
a plain numpy matmul of the same queries x corpus (the matrix-multiply bound). Writes
bench/results/index.json and index.png. Peers are benchmark-only dependencies:
``pip install faiss-cpu==1.15.1 hnswlib==0.8.0``.

Full mode adds real embeddings: a lookalike encoder is trained (a few minutes on CPU)
on 1,000 images per class of the CIFAR-10 train split in ../shared/data/cifar10/, then
embeds all 50,000 train images (the corpus) and 1,000 test images (held-out queries);
results under ``datasets.cifar10`` and index-cifar10.png. Skipped with a reason when the
data is absent, and in --quick.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from threadpoolctl import threadpool_limits

from lookalike.index.builder import IndexOptions, build_index
from lookalike.index.exact import exact_topk, recall_at_k
from lookalike.index.scann_module import scann_ops_pybind
from lookalike.index.searcher import ItemIndex
from lookalike.index.simd import enable_scann_simd

log = logging.getLogger("bench.index")
RESULTS = Path(__file__).parent / "results"
K = 10
TARGETS = (0.90, 0.95)
NOISE = 1.0  # per-dim noise = per-dim centre spread: clusters overlap, neighbours cross them


def clustered(n: int, dim: int, num_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around sqrt(n) random centres; queries drawn from the same mixture (held out)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(16, int(np.sqrt(n))), dim)).astype(np.float32)
    def draw(m):
        x = centres[rng.integers(0, len(centres), m)] + NOISE * rng.normal(size=(m, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    return draw(n), draw(num_queries)


def timed(fn, repeats: int = 3, min_total_s: float = 0.25) -> tuple[float, object]:
    """Best time of at least ``repeats`` runs and ``min_total_s`` seconds (the machine is shared)."""
    best, out, spent, i = np.inf, None, 0.0, 0
    while i < repeats or spent < min_total_s:
        t = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - t
        best, spent, i = min(best, elapsed), spent + elapsed, i + 1
    return best, out


def curve_point(name, params, search, queries, truth, threads_2: bool = True) -> dict:
    """One configuration: recall and QPS; ``_search`` (dropped before writing) lets ``refine`` time it again."""
    with threadpool_limits(1):
        s1, rows = timed(lambda: search(queries, 1))
    point = {"method": name, "params": params, "recall": round(recall_at_k(np.asarray(rows), truth), 4),
             "qps_1t": round(len(queries) / s1, 1), "_search": search}
    if threads_2:
        with threadpool_limits(2):
            s2, _ = timed(lambda: search(queries, 2))
        point["qps_2t"] = round(len(queries) / s2, 1)
    return point


def refine(points: list[dict], queries: np.ndarray, rounds: int = 5, per_method: int = 3) -> None:
    """Time the contenders again, interleaved across methods; each one's QPS becomes the median
    of those rounds.

    The machine is shared: a burst of load during one method's sweep would otherwise
    decide the comparison, and keeping the best of many noisy timings favours the method
    with the most points near a target. For every target, thread count and method the
    contenders are the ``per_method`` fastest points of the sweep reaching the target and
    the ``per_method`` cheapest ones (lowest recall still reaching it: the least work for a
    knob that trades speed for recall, whatever the sweep's noise said). They are re-timed
    in ``rounds`` rounds alternating between methods, so every method sees the same
    background load; ``best_at`` then compares re-timed points only.
    """
    for key, threads in (("qps_1t", 1), ("qps_2t", 2)):
        chosen: list[dict] = []
        for target in TARGETS:
            for m in sorted({p["method"] for p in points}):
                ok = [p for p in points if p["method"] == m and p["recall"] >= target and key in p]
                fastest = sorted(ok, key=lambda p: -p[key])[:per_method]
                cheapest = sorted(ok, key=lambda p: p["recall"])[:per_method]
                for p in fastest + cheapest:
                    if all(p is not c for c in chosen):
                        chosen.append(p)
        by_method = [[p for p in chosen if p["method"] == m] for m in sorted({p["method"] for p in chosen})]
        chosen = [p for group in itertools.zip_longest(*by_method) for p in group if p is not None]  # A B C A B C ...
        rates: list[list[float]] = [[] for _ in chosen]
        for _ in range(rounds):
            for p, rate in zip(chosen, rates):
                with threadpool_limits(threads):
                    s, _ = timed(lambda: p["_search"](queries, threads), repeats=3, min_total_s=0.1)
                rate.append(len(queries) / s)
        for p, rate in zip(chosen, rates):
            p[f"{key}_sweep"], p[key] = p[key], round(float(np.median(rate)), 1)
            p.setdefault("refined", []).append(key)


def run_scann(x, queries, truth, tmp: Path) -> tuple[dict, list[dict]]:
    ids = pa.table({"id": [str(i) for i in range(len(x))]})
    with threadpool_limits(2):
        t = time.perf_counter()
        manifest = build_index(x, ids, model_version="bench", out_dir=tmp / "scann", options=IndexOptions())
        total_s = time.perf_counter() - t
    load_s, index = timed(lambda: ItemIndex.load(tmp / "scann"), repeats=1, min_total_s=0)
    tuning = manifest["tuning"]

    def search(q, threads, leaves=None, reorder=None):
        index.set_search_threads(threads)
        return index.search_rows(q, K, leaves_to_search=leaves, reorder=reorder, parallel=threads > 1)[0]

    tuned = curve_point("scann", {"leaves_to_search": tuning["leaves_to_search"], "reorder": tuning["reorder"]},
                        lambda q, th: search(q, th), queries, truth)
    points = []
    num_leaves = index.manifest["build"].get("num_leaves", 1)
    if index.mode == "tree_exact":  # one knob: leaves_to_search, from 1/450 to 1/30 of the leaves
        grid = [(leaves, None) for leaves in sorted({max(1, round(num_leaves * f / 448)) for f in range(1, 16)})]
    else:
        leaves_all = [None] if index.mode != "tree_ah" else [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
        grid = [(leaves, reorder) for leaves in leaves_all for reorder in (20, 30, 40, 60, 80, 120, 160, 240)]
    for leaves, reorder in grid:
        points.append(curve_point("scann", {"leaves_to_search": leaves, "reorder": reorder},
                                  lambda q, th, leaves=leaves, reorder=reorder: search(q, th, leaves, reorder), queries, truth))
    build, tune = manifest["build_seconds"], manifest["tuning"]["tune_seconds"]
    info = {"mode": index.mode, "num_leaves": index.manifest["build"].get("num_leaves"),
            "scann_kernels": index.manifest.get("scann_kernels"), "build_s": build,
            "tune_s": tune, "build_and_tune_s": round(build + tune, 3), "build_index_wall_s": round(total_s, 2),
            "load_s": round(load_s, 3), "bytes_per_vector": manifest["memory"]["index_bytes_per_vector"],
            "autotuned": tuned, "tuning_on_corpus_sample": {k: tuning[k] for k in ("recall", "qps", "leaves_to_search", "reorder")}}
    return info, points + [tuned]


def run_faiss(x, queries, truth, tmp: Path) -> tuple[dict, list[dict]]:
    import faiss

    out, points = {}, []
    n, d = x.shape
    nlist = int(4 * np.sqrt(n))
    for name, factory, sweep in (
        ("faiss-hnsw32", "HNSW32,Flat",  # FAISS honours efSearch below k (unlike hnswlib)
         [("efSearch", ef) for ef in (4, 6, 8, 10, 12, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 384)]),
        ("faiss-ivfpqfs-refine", f"IVF{nlist},PQ{d // 2}x4fs,RFlat",
         [(("nprobe", p), ("k_factor", f)) for p in (2, 4, 6, 8, 12, 16, 24, 32, 48, 64) for f in (2, 3, 4, 6, 8, 16)]),
    ):
        faiss.omp_set_num_threads(2)
        t = time.perf_counter()
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        index.train(x[: min(n, max(100_000, 64 * nlist))])  # faiss wants >= ~39 points per list
        index.add(x)
        build_s = time.perf_counter() - t
        path = str(tmp / f"{name}.faiss")
        faiss.write_index(index, path)
        load_s, index = timed(lambda: faiss.read_index(path), repeats=1, min_total_s=0)
        out[name] = {"build_s": round(build_s, 2), "load_s": round(load_s, 3),
                     "bytes_per_vector": round(os.path.getsize(path) / n, 1), "factory": factory}

        def search(q, threads, setting, index=index):
            faiss.omp_set_num_threads(threads)
            if isinstance(setting[0], tuple):
                faiss.extract_index_ivf(index).nprobe = setting[0][1]
                index.k_factor = setting[1][1]
            else:
                faiss.downcast_index(index).hnsw.efSearch = setting[1]
            return index.search(q, K)[1]

        for setting in sweep:
            params = dict(setting) if isinstance(setting[0], tuple) else {setting[0]: setting[1]}
            points.append(curve_point(name, params, lambda q, th, setting=setting, search=search: search(q, th, setting), queries, truth))
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return out, points


def run_hnswlib(x, queries, truth, tmp: Path) -> tuple[dict, list[dict]]:
    import hnswlib

    n, d = x.shape
    out, points = {}, []
    # M=8 is the faster graph at recall ~0.90, M=16 at 0.95 and above. ef below k is no setting of its own:
    # hnswlib searches with max(ef, k), so ef=10 is its cheapest search at k=10
    for m, efs in ((8, (10, 11, 12, 13, 14, 16, 20, 24, 32, 48)),
                   (16, (10, 11, 12, 13, 14, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 384))):
        name = "hnswlib" if m == 16 else f"hnswlib-m{m}"
        t = time.perf_counter()
        index = hnswlib.Index(space="ip", dim=d)
        index.init_index(max_elements=n, M=m, ef_construction=100, random_seed=0)
        index.add_items(x, num_threads=2)
        build_s = time.perf_counter() - t
        path = tmp / f"{name}.bin"
        index.save_index(str(path))
        load_s, _ = timed(lambda: hnswlib.Index(space="ip", dim=d).load_index(str(path)), repeats=1, min_total_s=0)
        out[name] = {"build_s": round(build_s, 2), "load_s": round(load_s, 3), "M": m, "ef_construction": 100,
                     "bytes_per_vector": round(os.path.getsize(path) / n, 1)}
        for ef in efs:
            def search(q, threads, ef=ef, index=index):
                index.set_ef(ef)
                return index.knn_query(q, k=K, num_threads=threads)[0].astype(np.int64)
            points.append(curve_point(name, {"ef": ef}, search, queries, truth))
    return out, points


DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def cifar_embeddings(tmp: Path, num_queries: int, train_per_class: int = 1000, num_steps: int = 600) -> tuple[np.ndarray, np.ndarray, dict]:
    """(corpus [50000, 64], queries [num_queries, 64], info) embedded by a freshly trained lookalike encoder."""
    import shutil
    import tarfile

    from lookalike.model.artifact import load_encoder
    from lookalike.model.config import apply_overrides, get_config
    from lookalike.model.data import load_labelled_folder
    from lookalike.model.train import train_and_evaluate

    for split in ("train", "test"):
        with tarfile.open(DATA / f"cifar10_{split}_jpg.tar.gz") as tar:
            tar.extractall(tmp / "cifar", filter="data")
    train_dir = tmp / "cifar" / "train"
    subset = tmp / "cifar-subset"
    for class_dir in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        (subset / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[:train_per_class]:
            shutil.copy(f, subset / class_dir.name / f.name)
    config = apply_overrides(get_config("digits"), ["image_size=32", "channels=3", "embed_dim=64", f"num_steps={num_steps}"])
    started = time.perf_counter()
    trained = train_and_evaluate(config, tmp / "store", data_dir=subset)
    train_s = time.perf_counter() - started
    encoder = load_encoder(trained.model_dir)
    corpus = encoder.embed(load_labelled_folder(train_dir, encoder.spec).images)
    test = load_labelled_folder(tmp / "cifar" / "test", encoder.spec).images
    rng = np.random.default_rng(0)
    queries = encoder.embed(test[np.sort(rng.choice(len(test), num_queries, replace=False))])
    info = {"model_version": trained.version, "train_s": round(train_s, 1), "model_metrics": trained.metrics,
            "corpus": "CIFAR-10 train split, 50,000 JPEGs", "queries": f"{num_queries} CIFAR-10 test images"}
    return corpus, queries, info


def bruteforce_vs_matmul(dim: int, num_queries: int, n: int = 20_000) -> dict:
    """ScaNN brute force top-10 (our small-corpus mode) vs numpy Q @ X.T on the same data, 1 thread."""
    enable_scann_simd()  # as our brute_force mode runs it
    x, q = clustered(n, dim, num_queries, seed=1)
    searcher = scann_ops_pybind().builder(x, K, "dot_product").score_brute_force().build()
    searcher.set_num_threads(1)
    with threadpool_limits(1):
        matmul_s, _ = timed(lambda: q @ x.T, repeats=3)
        scann_s, (rows, _) = timed(lambda: searcher.search_batched(q, final_num_neighbors=K), repeats=3)
        numpy_s, (truth, _) = timed(lambda: exact_topk(q, x, K), repeats=3)
    return {"n": n, "dim": dim, "queries": num_queries, "matmul_qps": round(num_queries / matmul_s, 1),
            "scann_bruteforce_qps": round(num_queries / scann_s, 1), "numpy_exact_topk_qps": round(num_queries / numpy_s, 1),
            "scann_recall": round(recall_at_k(np.asarray(rows), truth), 4),
            "bruteforce_vs_matmul_bound": round(matmul_s / scann_s, 3)}


def best_at(points: list[dict], target: float, key: str) -> dict | None:
    """The fastest point reaching ``target`` recall, among the re-timed ones when there are any."""
    ok = [p for p in points if p["recall"] >= target and key in p]
    ok = [p for p in ok if key in p.get("refined", ())] or ok
    return max(ok, key=lambda p: p[key]) if ok else None


def compare(points: list[dict], builds: dict) -> dict:
    out = {}
    methods = sorted({p["method"] for p in points})
    for target in TARGETS:
        row = {}
        for key in ("qps_1t", "qps_2t"):
            best = {m: best_at([p for p in points if p["method"] == m], target, key) for m in methods}
            peers = {m: b[key] for m, b in best.items() if b and m != "scann"}
            ours = best["scann"][key] if best["scann"] else 0.0
            top = max(peers, key=peers.get) if peers else None
            row[key] = {"scann": ours, "scann_params": best["scann"] and best["scann"]["params"], "peers": peers,
                        "best_peer": top, "best_peer_qps": peers.get(top),
                        "ratio_to_best_peer": round(ours / peers[top], 3) if top else None}
        reached = [m for m in methods if m != "scann" and best_at([p for p in points if p["method"] == m], target, "qps_1t")]
        fastest = min(reached, key=lambda m: builds[m]["build_s"]) if reached else None
        peer_s = builds[fastest]["build_s"] if fastest else None
        # ours includes autotuning (the peers' builds have nothing to tune: their sweeps are outside)
        row["build_s_vs_fastest_peer"] = round(builds["scann"]["build_and_tune_s"] / peer_s, 3) if fastest else None
        row["build_only_s_vs_fastest_peer"] = round(builds["scann"]["build_s"] / peer_s, 3) if fastest else None
        row["fastest_building_peer"] = fastest
        out[f"{target:.2f}"] = row
    return out


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key in zip(axes, ("qps_1t", "qps_2t")):
        for m in sorted({p["method"] for p in points}):
            pts = sorted((p["recall"], p[key]) for p in points if p["method"] == m and key in p)
            front, best = [], 0.0  # Pareto frontier, from high recall down
            for r, q in sorted(pts, reverse=True):
                if q > best:
                    front.append((r, q))
                    best = q
            ax.plot([r for r, _ in front], [q for _, q in front], "o-", label=m, markersize=3)
        for t in TARGETS:
            ax.axvline(t, color="grey", lw=0.5)
        ax.set(xlabel="recall@10", ylabel=f"QPS ({key[-2]} thread{'s' if key[-2] == '2' else ''}, batched)", yscale="log",
               xlim=(0.8, 1.001), title=f"{title}: {key}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_cifar(num_queries: int, cache: Path | None = None) -> dict:
    """The comparison on CIFAR-10 embeddings; ``cache`` (.npz) keeps the embeddings between runs."""
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as saved:
            cx, cq, info = saved["corpus"], saved["queries"], json.loads(str(saved["info"]))
        log.info("using cached CIFAR-10 embeddings %s", cache)
    elif not (DATA / "cifar10_train_jpg.tar.gz").is_file():
        return {"skipped": f"{DATA} is absent"}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cx, cq, info = cifar_embeddings(Path(tmp), num_queries)
        if cache is not None:
            np.savez(cache, corpus=cx, queries=cq, info=json.dumps(info, default=str))
    cmp, builds, points = run_dataset(cx, cq)
    plot(points, RESULTS / "index-cifar10.png", f"CIFAR-10 embeddings {cx.shape[0]}x{cx.shape[1]}")
    return {**info, "n": int(cx.shape[0]), "dim": int(cx.shape[1]), "compare": cmp, "builds": builds, "curves": points}


def run_dataset(x: np.ndarray, queries: np.ndarray) -> tuple[dict, dict, list[dict]]:
    """Every method on one corpus: (comparison at the targets, build info, curve points)."""
    with threadpool_limits(2):
        truth = exact_topk(queries, x, K)[0]
    builds, points = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for run in (run_scann, run_faiss, run_hnswlib):
            log.info("running %s on %d x %d", run.__name__, *x.shape)
            info, pts = run(x, queries, truth, Path(tmp))
            builds.update({"scann": info} if run is run_scann else info)
            points += pts
        refine(points, queries)
    for p in points:
        p.pop("_search", None)
    return compare(points, builds), builds, points


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100k vectors instead of 1M (< 5 minutes)")
    parser.add_argument("--n", type=int, default=None, help="corpus size override")
    parser.add_argument("--cifar-only", action="store_true", help="only the CIFAR-10 embeddings (index-cifar10.json)")
    parser.add_argument("--cifar-cache", type=Path, default=None,
                        help="an .npz keeping the CIFAR-10 embeddings between runs (written if absent, else read)")
    args = parser.parse_args(argv)
    logging.basicConfig(force=True, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    n = args.n or (100_000 if args.quick else 1_000_000)
    dim, num_queries = 128, 1000
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.cifar_only:
        cifar = run_cifar(num_queries, args.cifar_cache)
        (RESULTS / "index-cifar10.json").write_text(json.dumps(cifar, indent=2, default=str) + "\n")
        log.info("wrote %s: %s", RESULTS / "index-cifar10.json", json.dumps({k: v for k, v in cifar.items() if k != "curves"}))
        return 0
    started = time.perf_counter()
    x, queries = clustered(n, dim, num_queries)
    cmp, builds, points = run_dataset(x, queries)
    plot(points, RESULTS / "index.png", f"clustered {n}x{dim}")
    bf = bruteforce_vs_matmul(dim, num_queries)
    at95 = cmp["0.95"]["qps_1t"]
    datasets = {"cifar10": {"skipped": "not in --quick"} if args.quick else run_cifar(num_queries, args.cifar_cache)}
    from importlib.metadata import version

    import faiss
    import hnswlib

    result = {
        "recall_at_10": builds["scann"]["autotuned"]["recall"],
        "qps": builds["scann"]["autotuned"]["qps_1t"],
        "qps_at_0_95": at95["scann"],
        "best_peer": at95["best_peer"], "best_peer_qps": at95["best_peer_qps"],
        "qps_vs_best_peer": at95["ratio_to_best_peer"],
        "qps_vs_best_peer_2t": cmp["0.95"]["qps_2t"]["ratio_to_best_peer"],
        "qps_vs_best_peer_at_0_90": cmp["0.90"]["qps_1t"]["ratio_to_best_peer"],
        "bruteforce_vs_matmul_bound": bf["bruteforce_vs_matmul_bound"],
        "build_s_vs_fastest_peer": cmp["0.95"]["build_s_vs_fastest_peer"],
        "dataset": {"name": "clustered", "n": n, "dim": dim, "queries": num_queries, "seed": 0, "noise": NOISE},
        "compare": cmp, "builds": builds, "bruteforce": bf, "curves": points, "datasets": datasets,
        "versions": {"scann": version("scann"), "faiss": faiss.__version__,
                     "hnswlib": getattr(hnswlib, "__version__", "0.8.0"), "numpy": np.__version__},
        "cpu_count": os.cpu_count(), "wall_s": round(time.perf_counter() - started, 1), "quick": args.quick,
    }
    (RESULTS / "index.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    summary = {k: v for k, v in result.items() if k not in ("curves", "compare", "builds", "datasets")}
    log.info("wrote %s: %s", RESULTS / "index.json", json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
