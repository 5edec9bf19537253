"""Where ``lookalike train`` gets its images: a labelled folder, an unlabelled folder of
images and videos, or a TFDS data set.

``load_training_data`` picks the loader from the config and arguments, so the training
loop sees one thing: ``LabelledImages`` (labels are classes, or instances when training
without labels). A TFDS data set is read offline from an already prepared data_dir
through the same builder lookup as ``lookalike embed --tfds`` (the error names the
data_dir searched); each example goes through the embed pipeline's PNG + ``decode_image``
path, so the model trains on exactly the pixels it will later embed. A data set without
a ``label`` feature is trained on without labels.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lookalike.model.config import TrainConfig
from lookalike.model.data import LabelledImages, load_labelled_folder
from lookalike.model.preprocess import PreprocessSpec, decode_image
from lookalike.model.unlabelled import load_unlabelled_folder

if TYPE_CHECKING:
    from lookalike.pipeline.tfds_source import TfdsSpec

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    data: LabelledImages
    config: TrainConfig  # the caller's, with ``unlabelled`` switched on for a source without labels
    source: str  # absolute folder, or tfds://NAME/SPLIT@DATA_DIR: names the run, recorded in the metrics


def load_tfds_images(tfds_spec: "TfdsSpec", spec: PreprocessSpec) -> tuple[LabelledImages, bool]:
    """Every example of a prepared TFDS split (or slice: ``tfds_source.split_ranges``) -> (images
    [N, H, W, C] with labels [N], labelled); ``paths`` are ``tfds://NAME/<base split>/<index>``.

    ``labelled`` is False when the data set has no ``label`` feature usable as classes
    (``tfds_source.label_feature``: a ClassLabel, or an integer scalar whose distinct values
    become the classes, named by value); the labels are then one instance per example.
    Raises TfdsNotAvailableError (naming the data_dir) when the data set is not prepared
    there; examples whose image cannot be converted (``png_bytes``:
    e.g. float values outside [0, 1]) or does not decode are skipped with a warning naming them."""
    from lookalike.pipeline.tfds_source import (URI_SCHEME, image_feature_name, iterate_examples, label_feature,
                                                load_builder, png_bytes, split_ranges)

    builder = load_builder(tfds_spec)
    key = image_feature_name(builder)
    label = label_feature(builder)  # the classes embed puts first in item ids
    labelled = label is not None
    images, labels, paths, failures = [], [], [], []
    examples = ((split, index, example) for split, start, stop in split_ranges(builder, tfds_spec)
                for index, example in iterate_examples(builder, split, start, stop))
    for split, index, example in examples:
        uri = f"{URI_SCHEME}{tfds_spec.name}/{split}/{index:06d}"  # the base split's index: the same in any slice
        try:
            images.append(decode_image(png_bytes(example[key]), spec))
        except (TypeError, ValueError, OSError) as e:  # cannot be converted (png_bytes), or ImageDecodeError
            log.warning("skipping TFDS example %s: %s", uri, e)
            failures.append((uri, str(e)))
            continue
        labels.append(int(example["label"]) if labelled else len(labels))
        paths.append(uri)
    if len(set(labels)) < 2:
        what = "classes" if labelled else "examples"
        raise ValueError(f"TFDS data set {tfds_spec.source} in {tfds_spec.data_dir}: {len(labels)} usable example(s), "
                         f"{len(set(labels))} distinct {what} ({len(failures)} unreadable); need at least 2 {what}")
    if not labelled:
        names = paths
    elif label.names is not None:
        names = list(label.names)
    else:  # an integer label: its distinct values, in order, named as embed names them
        values = sorted(set(labels))
        position = {v: i for i, v in enumerate(values)}
        labels = [position[v] for v in labels]
        names = [label.name(v) for v in values]
    log.info("TFDS %s: %d examples, %s", tfds_spec.source, len(labels),
             f"{len(set(labels))} classes" if labelled else "no label feature")
    data = LabelledImages(images=np.stack(images).astype(np.float32), labels=np.asarray(labels, np.int32),
                          class_names=names, paths=paths, failures=failures)
    return data, labelled


def as_instances(data: LabelledImages) -> LabelledImages:
    """The same images with their labels dropped: each one its own instance."""
    return dataclasses.replace(data, labels=np.arange(len(data.labels), dtype=np.int32), class_names=list(data.paths))


def load_training_data(
    config: TrainConfig, folder: str | Path, tfds: str | None = None, tfds_data_dir: str | None = None,
    exclude: Collection[str] = (),
) -> TrainingData:
    """The training images ``config`` and the source ask for: TFDS ``NAME[:SPLIT]`` when
    ``tfds`` is given, else ``folder`` (``<label>/*`` files, or any images and videos when
    ``config.unlabelled``), without the ``folder``-relative paths in ``exclude``."""
    spec = PreprocessSpec(image_size=config.image_size, channels=config.channels)
    if tfds:
        if exclude:
            raise ValueError(f"exclude applies to a training folder, not to the TFDS data set {tfds}")
        from lookalike.pipeline.tfds_source import TfdsSpec

        tfds_spec = TfdsSpec.parse(tfds, tfds_data_dir)
        data, labelled = load_tfds_images(tfds_spec, spec)
        if not labelled and not config.unlabelled:
            log.info("TFDS data set %s has no label feature: training without labels (augmented views)", tfds)
            config = dataclasses.replace(config, unlabelled=True)
        elif labelled and config.unlabelled:
            data = as_instances(data)
        return TrainingData(data, config, f"{tfds_spec.source}@{tfds_spec.data_dir}")
    folder = Path(folder)
    if config.unlabelled:
        data = load_unlabelled_folder(folder, spec, config.video_window_s, config.video_frame_interval_s, exclude)
    else:
        data = load_labelled_folder(folder, spec, exclude=exclude)
    if data.failures:
        log.warning("%d unreadable file(s) skipped in %s", len(data.failures), folder)
    return TrainingData(data, config, str(folder.absolute()))
