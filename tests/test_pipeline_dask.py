"""The same embed pipeline on a real dask.distributed cluster: a scheduler and two
worker processes on 127.0.0.1, started here; same result as the in-process runner."""

import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lookalike.pipeline.embed import EmbedConfig, read_embeddings, run_embed

distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")
DASK = [sys.executable, "-m", "dask"]  # the dask CLI, wherever the venv keeps its scripts


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """tcp address of a scheduler with two single-threaded worker processes."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path_factory.mktemp("dask")
    procs = [subprocess.Popen([*DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=open(logs / "scheduler.log", "w"), stderr=subprocess.STDOUT)]
    for i in range(2):
        procs.append(subprocess.Popen(
            [*DASK, "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard", "--name", f"w{i}"],
            stdout=open(logs / f"worker{i}.log", "w"), stderr=subprocess.STDOUT))
    try:
        with distributed.Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            assert len(client.scheduler_info()["workers"]) == 2
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_dask_cluster_gives_the_same_embeddings_and_dead_letters(tmp_path, indexed_store, dask_cluster, caplog):
    workdir = tmp_path / "w [1]"  # folder names with glob characters are folders, on the workers too
    shutil.copytree(indexed_store.root / "models", workdir / "models")
    corpus = tmp_path / "photos [2024]?"
    shutil.copytree(indexed_store.corpus_dir, corpus)
    tagged = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.png"))[::3]
    (corpus / "0" / "broken.png").write_text("not an image")
    metadata = tmp_path / "meta.csv"  # read by path on the workers
    metadata.write_text("id,source,tags\n" + "".join(f"{i},dask,a;b\n" for i in tagged))
    with caplog.at_level(logging.INFO, logger="lookalike.pipeline.embed"):
        summary = run_embed(EmbedConfig(
            workdir=str(workdir), corpus=str(corpus), runner="dask",
            beam_args=[f"--dask_client_address={dask_cluster}"], num_shards=2, metadata=str(metadata),
        ))
    done = [r.getMessage() for r in caplog.records if "read and embed: all" in r.getMessage()]
    assert len(done) == 1 and done[0].endswith("done by the workers in " + done[0].rsplit(" in ", 1)[1]), done
    assert "0 item(s)" not in done[0]  # no metrics on Dask: no counts rather than zeros
    assert summary.failed == 1 and summary.dead_letter_examples[0]["uri"].endswith("broken.png")
    emb_dask, items_dask = read_embeddings(workdir / "embeddings" / summary.run)
    emb_local, items_local = read_embeddings(next(indexed_store.embeddings_dir.glob("e-*")))
    assert items_dask.column("id").to_pylist() == items_local.column("id").to_pylist()
    np.testing.assert_allclose(emb_dask, emb_local, atol=1e-5)
    assert summary.embedded == len(items_local) and summary.index_version
    assert len(list((workdir / "embeddings" / summary.run).glob("embeddings-*-of-00002.parquet"))) == 2
    from lookalike.index.searcher import ItemIndex

    index = ItemIndex.load(workdir / "indexes" / summary.index_version)  # built shard by shard on the workers
    assert len(index.manifest["shards"]) == 2 and len(index) == len(items_local)
    assert index.search(emb_dask[:5], k=1)[0][0].id == items_dask.column("id")[0].as_py()
    found = index.search(emb_dask[0], k=len(index), where={"tags": "b", "source": "dask"})[0]
    assert sorted(n.id for n in found) == tagged and summary.metadata["unmatched_ids"] == 0


def test_a_tfds_run_on_dask_reports_the_examples_read(tmp_path, trained_store, tfds_dir, dask_cluster):
    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    summary = run_embed(EmbedConfig(workdir=str(workdir), tfds="lookalike_tiny_floats", tfds_data_dir=str(tfds_dir),
                                    runner="dask", beam_args=[f"--dask_client_address={dask_cluster}"], publish=False))
    # The Dask runner reports no metrics: a TFDS source's count is known (every selected example is read).
    assert (summary.files_matched, summary.files_read, summary.items, summary.failed) == (12, 12, 10, 2)


def test_an_unreachable_scheduler_is_a_one_line_error(tmp_path, trained_store, capsys):
    from lookalike.pipeline.cli import main

    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root, workdir)
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    code = main(["embed", "--workdir", str(workdir), "--runner", "dask", "--run-name", "r",
                 f"--dask_client_address={address}", "--dask_connection_timeout=2"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("lookalike embed: error: cannot connect to the Dask scheduler at " + address), line
    assert not (workdir / "embeddings" / "r").exists()


def test_a_scheduler_without_workers_warns_then_fails_clearly(tmp_path, trained_store, caplog):
    import logging

    from lookalike.pipeline.dask_runner import DaskRunnerError

    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root, workdir)
    port = free_port()
    scheduler = subprocess.Popen(
        [*DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port),
         "--no-dashboard"], stdout=open(tmp_path / "scheduler.log", "w"), stderr=subprocess.STDOUT)
    try:
        with distributed.Client(f"tcp://127.0.0.1:{port}", timeout=60):
            pass  # the scheduler is up
        with caplog.at_level(logging.WARNING), pytest.raises(DaskRunnerError, match="no Dask worker connected .* within 3 s"):
            run_embed(EmbedConfig(workdir=str(workdir), runner="dask", publish=False, beam_args=[
                f"--dask_client_address=127.0.0.1:{port}", "--dask_worker_timeout_s=3"]))
        assert any("no Dask workers are connected" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        scheduler.terminate()
        try:
            scheduler.wait(timeout=20)
        except subprocess.TimeoutExpired:
            scheduler.kill()
