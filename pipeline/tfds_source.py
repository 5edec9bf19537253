"""A TFDS data set as a corpus: ``lookalike embed --tfds NAME[:SPLIT] --tfds-data-dir DIR``.

SPLIT takes TFDS's split syntax (``train``, ``train[:100]``, ``train[10%:20%]``,
``train+test``; ``split_ranges``). An example is named by its base split and its index in
it, whatever slice selects it, so its item id is the same in every run that includes it.

Works offline when the data set is already prepared in ``data_dir`` (lookalike never
downloads); otherwise a clear error names the data set and the folder searched. Each
example's image is encoded losslessly (PNG) so it gets a content hash (sha256 of the PNG
bytes) and flows through the same decode, embed and write stages as a file: with
``--incremental``, an example whose hash the embedding cache holds for the model is
reused, not decoded or embedded again, and one whose bytes failed to decode before is
dead-lettered again; float images (values in [0, 1]) become
8-bit, and an example whose image cannot be converted is dead-lettered. Item ids put the class label first
when the data set has one (``<label>/<name>-<split>-<index>.png``, ``split`` the base split), like a folder corpus: a ClassLabel's
name, or an integer label's value (``LabelFeature``, the classes ``lookalike train --tfds`` uses).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from PIL import Image

log = logging.getLogger(__name__)

RANGE_SIZE = 1000
URI_SCHEME = "tfds://"


class TfdsNotAvailableError(RuntimeError):
    """The named TFDS data set is not prepared in the local data_dir."""


@dataclass(frozen=True)
class TfdsSpec:
    name: str
    split: str
    data_dir: str

    @classmethod
    def parse(cls, text: str, data_dir: str | None) -> "TfdsSpec":
        name, _, split = text.partition(":")
        if not name:
            raise ValueError(f"--tfds {text!r}: expected NAME or NAME:SPLIT")
        default_dir = Path.home() / "tensorflow_datasets"
        return cls(name=name, split=split or "train", data_dir=str(Path(data_dir or default_dir).expanduser().resolve()))

    @property
    def root(self) -> str:
        """The prefix item ids are made relative to: the data set, not the split or slice, so
        an example's id does not depend on the slice that selects it (its uri is
        ``<root>/[<label>/]<name>-<base split>-<index>.png``)."""
        return f"{URI_SCHEME}{self.name}"

    @property
    def source(self) -> str:
        """The data set and split as asked for (``tfds://NAME/SPLIT``, slices included): names a training run."""
        return f"{URI_SCHEME}{self.name}/{self.split}"


class _UnusableVariantNoise(logging.Filter):
    """Drops TFDS's absl warnings about a version folder it cannot use ("Variant folder
    .../cifar10/3.0.2 has no dataset_info.json", also for a folder that does not exist): while
    we look for a data set, our TfdsNotAvailableError says what was searched and what to do.
    They are logged at DEBUG instead (-v)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Variant folder "):
            log.debug("tfds: %s", record.getMessage())
            return False
        return True


@contextmanager
def _quiet_unusable_variants() -> Iterator[None]:
    absl = logging.getLogger("absl")
    noise = _UnusableVariantNoise()
    absl.addFilter(noise)
    try:
        yield
    finally:
        absl.removeFilter(noise)


def load_builder(spec: TfdsSpec):
    """The prepared builder for ``spec``, or TfdsNotAvailableError naming what was searched."""
    import tensorflow_datasets as tfds

    with _quiet_unusable_variants():  # TFDS's own warnings about what it did not find: our error says it
        try:
            builder = tfds.builder(spec.name, data_dir=spec.data_dir, try_gcs=False)
        except tfds.core.registered.DatasetNotFoundError:
            versions = sorted(Path(spec.data_dir, spec.name).glob("*/dataset_info.json"))
            if not versions:
                raise TfdsNotAvailableError(
                    f"TFDS data set {spec.name!r} is neither a known builder nor prepared under {spec.data_dir}"
                ) from None
            builder = tfds.builder_from_directory(str(versions[-1].parent))
        prepared = builder.is_prepared()
    if not prepared:
        raise TfdsNotAvailableError(
            f"TFDS data set {spec.name!r} is not prepared in data_dir {spec.data_dir} (looked in {builder.data_dir}); "
            f"lookalike never downloads: run `tfds build {spec.name} --data_dir {spec.data_dir}` where there is "
            "network access and copy the folder here"
        )
    split_ranges(builder, spec)  # the split exists and its slices fit: checked before anything runs
    return builder


def _split_names(instruction) -> list[str]:
    """The base split names of a (possibly composite: ``a+b``) ``tfds.core.ReadInstruction``."""
    if hasattr(instruction, "left") and hasattr(instruction, "right"):
        return _split_names(instruction.left) + _split_names(instruction.right)
    return [instruction.split_name]


def split_ranges(builder, spec: TfdsSpec) -> list[tuple[str, int, int]]:
    """The examples ``spec.split`` selects, as (base split, start, stop) ranges of indices in
    that split. ``spec.split`` takes TFDS's split syntax (``tfds.core.ReadInstruction``):
    ``train``, ``train[:100]``, ``train[-10:]``, ``train[10%:20%]``, ``train+test``.
    Overlapping or adjacent ranges of one split are merged, so each example is read once
    and item ids stay unique. Raises TfdsNotAvailableError naming the splits the data set
    has for an unknown base split, and ValueError naming the input for bad syntax or a
    slice beyond the split."""
    import tensorflow_datasets as tfds

    splits = builder.info.splits
    asked = f"--tfds {spec.name}:{spec.split}"
    try:
        instruction = tfds.core.ReadInstruction.from_spec(spec.split)
    except (ValueError, AssertionError):
        raise ValueError(
            f"{asked}: {spec.split!r} is not a TFDS split: expected SPLIT, SPLIT[FROM:TO] (example numbers or "
            "percentages, e.g. train[:100] or train[10%:20%]) or SPLIT+SPLIT; see "
            "https://www.tensorflow.org/datasets/splits") from None
    unknown = [name for name in _split_names(instruction) if name not in splits]
    if unknown:
        within = f" (in {spec.split!r})" if unknown[0] != spec.split else ""
        raise TfdsNotAvailableError(
            f"TFDS data set {spec.name!r} has no split {unknown[0]!r}{within}; it has {sorted(splits)}")
    try:
        absolute = instruction.to_absolute(splits)
    except ValueError as e:  # e.g. "Requested slice [:50] incompatible with 30 examples."
        raise ValueError(f"{asked}: {e}") from None
    spans: dict[str, list[list[int]]] = {}
    for part in absolute:
        start = part.from_ or 0
        stop = splits[part.splitname].num_examples if part.to is None else part.to
        if stop > start:
            spans.setdefault(part.splitname, []).append([start, stop])
    ranges = []
    for name, parts in spans.items():
        merged: list[list[int]] = []
        for start, stop in sorted(parts):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], stop)
            else:
                merged.append([start, stop])
        ranges += [(name, start, stop) for start, stop in merged]
    return ranges


def example_ranges(spec: TfdsSpec) -> list[tuple[str, int, int]]:
    """``split_ranges`` cut into (base split, start, stop) ranges of at most RANGE_SIZE examples."""
    return [(name, start, min(start + RANGE_SIZE, stop))
            for name, first, stop in split_ranges(load_builder(spec), spec)
            for start in range(first, stop, RANGE_SIZE)]


def image_feature_name(builder) -> str:
    import tensorflow_datasets as tfds

    names = [k for k, f in builder.info.features.items() if isinstance(f, tfds.features.Image)]
    if not names:
        raise TfdsNotAvailableError(f"TFDS data set {builder.name!r} has no image feature")
    return "image" if "image" in names else names[0]


@dataclass(frozen=True)
class LabelFeature:
    """A data set's ``label`` feature as classes, named alike by ``train`` and ``embed``: a
    ClassLabel by its names, an integer scalar (``tf.int64`` Tensor) by its decimal value."""

    names: tuple[str, ...] | None  # a ClassLabel's names; None: an integer label, named by its value

    def name(self, value: Any) -> str:
        """The class name of a label value: the first part of an embedded item's id, a training class."""
        return self.names[int(value)] if self.names is not None else str(int(value))


def label_feature(builder) -> LabelFeature | None:
    """The data set's ``label`` feature as classes, or None when it has none; a label feature
    that is neither a ClassLabel nor an integer scalar (a string, a float, a vector) is not
    used as classes, with a warning naming it."""
    import tensorflow_datasets as tfds

    features = builder.info.features
    if "label" not in features.keys():
        return None
    label = features["label"]
    if isinstance(label, tfds.features.ClassLabel):
        return LabelFeature(tuple(label.names))
    dtype = np.dtype(getattr(label, "np_dtype", None) or np.void)
    if isinstance(label, tfds.features.Tensor) and tuple(label.shape) == () and dtype.kind in "iu":
        return LabelFeature(None)
    log.warning("TFDS data set %r: its 'label' feature (%s) is neither a ClassLabel nor an integer scalar; "
                "it is not used as classes", builder.name, label)
    return None


def iterate_examples(builder, split: str, start: int, stop: int):
    """(index, example dict of numpy values) for examples [start, stop) of ``split`` (a base split's name)."""
    import tensorflow_datasets as tfds

    try:
        source = builder.as_data_source(split=split)
        for i in range(start, stop):
            yield i, source[i]
    except NotImplementedError:  # TFRecord format: sequential read
        ds = builder.as_dataset(split=f"{split}[{start}:{stop}]", shuffle_files=False)
        for offset, example in enumerate(tfds.as_numpy(ds)):
            yield start + offset, example


def png_bytes(image: np.ndarray) -> bytes:
    """An example's image as lossless PNG bytes.

    uint8 images are kept as they are, and single-channel uint16 ones at 16 bits; a
    float image (``tfds.features.Image(dtype=float32)``) must hold values in [0, 1],
    which become 0-255 (``x * 255`` rounded). Raises ValueError with the reason for an image
    that cannot be converted: float values outside [0, 1] or not finite, an empty array,
    a shape or dtype PNG cannot hold."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ValueError(f"image of shape {tuple(np.shape(image))} is not a picture (H x W, or H x W x channels)")
    if arr.dtype.kind == "f":
        arr = float_to_uint8(arr)
    elif arr.dtype == np.uint16 and arr.ndim == 3:  # PIL has no 16-bit colour mode: keep the high bytes
        arr = (arr >> 8).astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    buf = io.BytesIO()
    try:
        Image.fromarray(arr).save(buf, format="PNG")
    except (TypeError, ValueError, OSError) as e:  # a dtype or channel count PIL or PNG cannot hold
        raise ValueError(f"image of dtype {arr.dtype} and shape {tuple(np.shape(image))} cannot be encoded: {e}") from None
    return buf.getvalue()


def float_to_uint8(arr: np.ndarray) -> np.ndarray:
    """A float image with values in [0, 1] as uint8 0-255; ValueError for other values."""
    finite = np.isfinite(arr)
    if not finite.all():
        raise ValueError(f"float image has {int(arr.size - finite.sum())} NaN or infinite value(s)")
    low, high = float(arr.min()), float(arr.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"float image values must be in [0, 1], found {low:g} to {high:g}")
    return np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)


class ReadTfdsRangeFn(beam.DoFn):
    """(base split, start, stop) -> ("new", (hash, uri, png bytes)) per example, like ReadSourceFn for files;
    ("dead", letter) for an example whose image cannot be converted (``png_bytes``). With an
    embedding cache (``--incremental``), an example whose hash the cache holds goes on as
    ("cached", (uri, hash)) (``reuse.ReusedItemsFn``), and one whose bytes failed to decode in
    an earlier run as its dead letter again."""

    def __init__(self, spec: TfdsSpec, cache_dir: str | None = None):
        self._spec = spec
        self._cache_dir = cache_dir
        self._read = Metrics.counter("lookalike", "files_read")  # examples read (summary.json's files_read)
        self._failed = Metrics.counter("lookalike", "files_failed")
        self._reused = Metrics.counter("lookalike", "files_unchanged")

    def setup(self) -> None:
        from lookalike.pipeline.cache import cached_hashes, load_failed

        usable = bool(self._cache_dir and os.path.isdir(self._cache_dir))
        self._cache = cached_hashes(self._cache_dir) if usable else set()
        self._undecodable = load_failed(self._cache_dir) if usable else {}
        self._builder = load_builder(self._spec)
        self._image_key = image_feature_name(self._builder)
        self._label = label_feature(self._builder)

    def item_uri(self, split: str, index: int, example: dict[str, Any]) -> str:
        """``tfds://<name>/[<label>/]<name>-<base split>-<index>.png``: the same whatever slice selects the example."""
        base = f"{self._spec.name}-{split}-{index:06d}.png"
        if self._label is not None and "label" in example:
            return f"{self._spec.root}/{self._label.name(example['label'])}/{base}"
        return f"{self._spec.root}/{base}"

    def process(self, bounds: tuple[str, int, int]):
        from lookalike.pipeline.sources import CACHED, DEAD, NEW, dead_letter, known_failure_letter

        split, start, stop = bounds
        for index, example in iterate_examples(self._builder, split, start, stop):
            uri = self.item_uri(split, index, example)
            self._read.inc()
            try:
                data = png_bytes(example[self._image_key])
            except ValueError as e:  # listed by the run summary, as a file that does not decode
                self._failed.inc()
                yield DEAD, dead_letter(uri, "read", str(e))
                continue
            source_hash = hashlib.sha256(data).hexdigest()
            if source_hash in self._cache:  # an embedding wins over a failure record (``ReadSourceFn.known_outputs``)
                self._reused.inc()
                yield CACHED, (uri, source_hash)
            elif source_hash in self._undecodable:  # these bytes failed to decode in an earlier run
                self._failed.inc()
                yield DEAD, known_failure_letter(uri, *self._undecodable[source_hash])
            else:
                yield NEW, (source_hash, uri, data)
