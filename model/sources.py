"""Where ``lookalike train`` gets its images: a labelled folder, or an unlabelled folder
of images and videos.

``load_training_data`` picks the loader from the config, so the training loop sees one
thing: ``LabelledImages`` (labels are classes, or instances when training without labels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lookalike.model.config import TrainConfig
from lookalike.model.data import LabelledImages, load_labelled_folder
from lookalike.model.preprocess import PreprocessSpec
from lookalike.model.unlabelled import load_unlabelled_folder

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    data: LabelledImages
    config: TrainConfig  # the caller's (a source without labels will switch ``unlabelled`` on)
    source: str  # absolute folder: names the run, recorded in the metrics


def load_training_data(config: TrainConfig, folder: str | Path) -> TrainingData:
    """The training images ``config`` asks for: ``folder``'s ``<label>/*`` files, or any
    images and videos under it when ``config.unlabelled``."""
    spec = PreprocessSpec(image_size=config.image_size, channels=config.channels)
    folder = Path(folder)
    if config.unlabelled:
        data = load_unlabelled_folder(folder, spec, config.video_window_s, config.video_frame_interval_s)
    else:
        data = load_labelled_folder(folder, spec)
    if data.failures:
        log.warning("%d unreadable file(s) skipped in %s", len(data.failures), folder)
    return TrainingData(data, config, str(folder.absolute()))
