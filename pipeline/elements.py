"""Pipeline elements that carry image batches, with Beam coders that size them cheaply.

Beam samples the size of the elements of every PCollection (its MeanByteCount metric)
by encoding them with the PCollection's coder: every one of the first 10 elements, then
about 7 per doubling of the count. The default coder pickles. A [256, H, W, C] float32
batch was copied for each sample on each of the four PCollections it crosses, and an
asynchronous inference (``PendingEmbeddings``) was waited for on the spot, so a sampled
batch lost its overlap of inference with the next batch's decoding: in a profile of a
50,000-image run, 40 % of the bundle thread's waits for XLA came from size sampling.

The element types here are tuples (code that unpacks them is unchanged) with a
registered coder whose ``estimate_size`` adds up array sizes without encoding or
waiting. Encoding, at a real stage boundary (multi-process or distributed runners),
pickles the values as before; the output types are declared with ``with_output_types``
so Beam picks these coders.

Arrow tables (items per shard, file index rows) cross every GroupByKey, where even the
in-process runner encodes them, regroups and decodes them again: ``ArrowTableCoder``
writes them as an Arrow IPC stream (for 50,000 items, 12 ms to encode and 5 ms to decode
against 39 and 28 ms pickled), for PCollections typed ``ShardTable`` or ``pa.Table``.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pyarrow as pa
from apache_beam import coders, typehints

from lookalike.model.artifact import PendingEmbeddings

# Items of a long list whose sizes are added up; the rest are assumed alike.
SIZE_SAMPLE_ITEMS = 16
# Bytes assumed for values with no cheaper way to size them (numbers, None, other objects).
SMALL_VALUE_BYTES = 8


def estimate_nbytes(value: Any) -> int:
    """Roughly the encoded size of ``value`` in bytes, without encoding it: arrays by
    ``nbytes``, an asynchronous inference by its shape (not waited for), strings and bytes
    by length, containers by their items (long lists from a sample of them)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, PendingEmbeddings):
        return value.nbytes
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, pa.Table):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(estimate_nbytes(k) + estimate_nbytes(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):  # NamedTuples too, such as Beam's PredictionResult
        if len(value) <= SIZE_SAMPLE_ITEMS:
            return sum(estimate_nbytes(v) for v in value)
        sample = value[:SIZE_SAMPLE_ITEMS]
        return sum(estimate_nbytes(v) for v in sample) * len(value) // len(sample)
    return SMALL_VALUE_BYTES


class _Pair(tuple):
    """A 2-tuple of a named kind: unpacks like a tuple, pickles as its own type."""

    __slots__ = ()

    def __new__(cls, first: Any, second: Any):
        return tuple.__new__(cls, (first, second))

    def __getnewargs__(self) -> tuple[Any, Any]:
        return tuple(self)


class Routed(_Pair):
    """(tag, value): an output of a DoFn with several kinds of outputs, routed by tag
    (``batches.split_tagged``)."""

    __slots__ = ()

    @property
    def tag(self) -> str:
        return self[0]

    @property
    def value(self) -> Any:
        return self[1]


class ItemBatch(_Pair):
    """(metas, pixels): one inference batch, a list of B item metadata dicts and the
    [B, H, W, C] float32 model input."""

    __slots__ = ()

    @property
    def metas(self) -> list[dict[str, Any]]:
        return self[0]

    @property
    def pixels(self) -> np.ndarray:
        return self[1]


class EmbeddedBatch(_Pair):
    """(metas, result): an inference batch's metadata and Beam's ``PredictionResult``
    whose ``inference`` is [B, embed_dim] (a ``PendingEmbeddings`` while computing)."""

    __slots__ = ()

    @property
    def metas(self) -> list[dict[str, Any]]:
        return self[0]

    @property
    def result(self) -> Any:
        return self[1]


class _SizedTupleCoder(coders.Coder):
    """Pickles one of the pair types above; sizes it with ``estimate_nbytes``."""

    element_type: type = _Pair

    def encode(self, value: tuple) -> bytes:
        return pickle.dumps(tuple(value), protocol=pickle.HIGHEST_PROTOCOL)

    def decode(self, encoded: bytes) -> tuple:
        return self.element_type(*pickle.loads(encoded))

    def estimate_size(self, value: tuple) -> int:
        return estimate_nbytes(tuple(value))

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self) -> type:
        return self.element_type


class RoutedCoder(_SizedTupleCoder):
    element_type = Routed


class ItemBatchCoder(_SizedTupleCoder):
    element_type = ItemBatch


class EmbeddedBatchCoder(_SizedTupleCoder):
    element_type = EmbeddedBatch


for _coder in (RoutedCoder, ItemBatchCoder, EmbeddedBatchCoder):
    coders.registry.register_coder(_coder.element_type, _coder)


class ArrowTableCoder(coders.Coder):
    """``pa.Table`` as an Arrow IPC stream (the schema travels with the rows); sized by ``nbytes``."""

    def encode(self, table: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    def decode(self, encoded: bytes) -> pa.Table:
        return pa.ipc.open_stream(pa.py_buffer(encoded)).read_all()

    def estimate_size(self, table: pa.Table) -> int:
        return int(table.nbytes)

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self) -> type:
        return pa.Table


coders.registry.register_coder(pa.Table, ArrowTableCoder)

# (shard, items table) and (key, file index rows): a key Beam can group by and an Arrow table.
ShardTable = typehints.Tuple[int, pa.Table]
