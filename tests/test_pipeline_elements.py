"""Batch-carrying pipeline elements: their coders round-trip, and size them without waiting."""

import apache_beam as beam
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.coders import registry
from apache_beam.ml.inference.base import PredictionResult, RunInference
from apache_beam.testing.util import assert_that, equal_to

from lookalike.model.artifact import PendingEmbeddings
from lookalike.pipeline.batches import split_tagged
from lookalike.pipeline.elements import (ArrowTableCoder, EmbeddedBatch, EmbeddedBatchCoder, ItemBatch, ItemBatchCoder,
                                         Routed, RoutedCoder, ShardTable, estimate_nbytes)
from lookalike.pipeline.embed import EmbedConfig, pipeline_options
from lookalike.pipeline.inference import FlaxEncoderHandler


class NeverReady(PendingEmbeddings):
    """An inference that fails the test if anything waits for it."""

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("size estimation waited for the inference")


def metas(n):
    return [{"id": f"item-{i:03d}.jpg", "uri": f"/corpus/item-{i:03d}.jpg", "frame": None} for i in range(n)]


def test_coders_are_registered_for_the_element_types():
    assert isinstance(registry.get_coder(Routed), RoutedCoder)
    assert isinstance(registry.get_coder(ItemBatch), ItemBatchCoder)
    assert isinstance(registry.get_coder(EmbeddedBatch), EmbeddedBatchCoder)


def test_elements_round_trip_and_unpack_as_tuples():
    pixels = np.random.default_rng(0).random((3, 4, 4, 3), dtype=np.float32)
    batch = ItemBatch(metas(3), pixels)
    decoded = ItemBatchCoder().decode(ItemBatchCoder().encode(batch))
    assert type(decoded) is ItemBatch
    got_metas, got_pixels = decoded
    assert got_metas == metas(3)
    np.testing.assert_array_equal(got_pixels, pixels)
    routed = RoutedCoder().decode(RoutedCoder().encode(Routed("batch", batch)))
    assert type(routed) is Routed and routed.tag == "batch" and routed[0] == "batch"
    np.testing.assert_array_equal(routed.value.pixels, pixels)


def test_an_embedded_batch_encodes_its_finished_inference_as_an_array():
    values = jnp.arange(8 * 4, dtype=jnp.float32).reshape(8, 4)
    batch = EmbeddedBatch(metas(5), PredictionResult(None, PendingEmbeddings(values, 5), model_id="m-1"))
    decoded = EmbeddedBatchCoder().decode(EmbeddedBatchCoder().encode(batch))
    assert type(decoded) is EmbeddedBatch and decoded.metas == metas(5)
    np.testing.assert_array_equal(decoded.result.inference, np.asarray(values)[:5])
    assert decoded.result.model_id == "m-1"


def test_size_estimates_count_array_bytes_and_never_wait():
    pending = NeverReady(jnp.zeros((256, 64), jnp.float32), 200)
    batch = EmbeddedBatch(metas(200), PredictionResult(None, pending, model_id="m-1"))
    size = EmbeddedBatchCoder().estimate_size(batch)  # would raise if it waited
    assert size >= 200 * 64 * 4
    with pytest.raises(AssertionError, match="waited"):
        EmbeddedBatchCoder().encode(batch)  # a real encode does wait: the estimate is what is cheap
    pixels = np.zeros((200, 32, 32, 3), np.float32)
    item_size = ItemBatchCoder().estimate_size(ItemBatch(metas(200), pixels))
    assert pixels.nbytes < item_size < pixels.nbytes + 200 * 200
    # Long lists are sized from a sample, close to their full size.
    exact = sum(estimate_nbytes(m) for m in metas(200))
    assert abs(estimate_nbytes(metas(200)) - exact) <= exact * 0.05


def test_declared_batches_flow_through_run_inference_with_these_coders(trained_store, encoder):
    """split_tagged's declared type reaches RunInference and its declared output; results equal
    the encoder's, on Beam's in-process runner."""
    rng = np.random.default_rng(2)
    images = [rng.random((n, *encoder.spec.shape), dtype=np.float32) for n in (3, 5)]
    expected = [(i, encoder.embed(x)) for i, x in enumerate(images)]
    handler = FlaxEncoderHandler(str(trained_store.require_model()), min_batch_size=1, max_batch_size=1,
                                 encoder_batch=8)
    with beam.Pipeline(options=pipeline_options(EmbedConfig(workdir="unused"))) as p:
        tagged = p | beam.Create([Routed("batch", ItemBatch([{"i": i}], x)) for i, x in enumerate(images)]
                                 + [Routed("dead", {"uri": "x"})]).with_output_types(Routed)
        batches = split_tagged(tagged, ("batch", "dead"), "T", {"batch": ItemBatch})["batch"]
        assert isinstance(registry.get_coder(batches.element_type), ItemBatchCoder)
        embedded = batches | RunInference(handler).with_output_types(EmbeddedBatch)
        assert isinstance(registry.get_coder(embedded.element_type), EmbeddedBatchCoder)
        rows = embedded | beam.Map(lambda b: (b.metas[0]["i"], np.round(np.asarray(b.result.inference), 4).tolist()))
        assert_that(rows, equal_to([(i, np.round(e, 4).tolist()) for i, e in expected]))


def items_table(n: int, dim: int = 4) -> pa.Table:
    emb = np.arange(n * dim, dtype=np.float32).reshape(n, dim)
    return pa.table({
        "id": pa.array([f"a/{i}.jpg" for i in range(n)]),
        "timestamp_s": pa.array([None if i % 2 else i * 0.5 for i in range(n)], pa.float64()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
    })


def test_shard_tables_travel_as_arrow_ipc_and_round_trip_exactly():
    coder = registry.get_coder(ShardTable)
    assert isinstance(coder.coders()[1], ArrowTableCoder)
    table = items_table(5)
    shard, decoded = coder.decode(coder.encode((3, table)))
    assert shard == 3 and decoded.equals(table) and decoded.schema == table.schema
    empty = ArrowTableCoder().decode(ArrowTableCoder().encode(table.schema.empty_table()))
    assert len(empty) == 0 and empty.schema == table.schema
    assert ArrowTableCoder().estimate_size(table) == table.nbytes == estimate_nbytes(table)


def test_shard_tables_group_by_shard_on_the_in_process_runner():
    """Tables declared ShardTable cross a GroupByKey with the Arrow coder and arrive whole."""
    tables = [(i % 2, items_table(3 + i)) for i in range(4)]
    with beam.Pipeline(options=pipeline_options(EmbedConfig(workdir="unused"))) as p:
        keyed = p | beam.Create(tables).with_output_types(ShardTable)
        assert isinstance(registry.get_coder(keyed.element_type).coders()[1], ArrowTableCoder)
        grouped = keyed | beam.GroupByKey() | beam.MapTuple(lambda shard, ts: (shard, sorted(len(t) for t in ts)))
        assert_that(grouped, equal_to([(0, [3, 5]), (1, [4, 6])]))
