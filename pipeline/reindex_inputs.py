"""What a reindex run works on, settled before its first step: the corpus folder, the
training config and the metadata file, each from the run's own settings, else from what
the served index and model used, else the store's defaults; each choice is logged with
its reason, and a missing or unusable one fails the run before training, naming it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lookalike.model.config import TrainConfig
from lookalike.model.data import not_a_folder
from lookalike.model.store import Store, StoreError

if TYPE_CHECKING:
    from lookalike.pipeline.reindex import ReindexConfig

log = logging.getLogger(__name__)

def resolve_corpus(config: ReindexConfig, store: Store, served_manifest: dict[str, Any] | None,
                   served_version: str | None) -> Path:
    """The labelled folder this run trains on and embeds: ``config.corpus``, else the corpus
    folder the served index was embedded from (its manifest's ``source``, so a crontab line
    written once follows ``embed --corpus``), else ``DIR/corpus`` (a served index whose manifest
    records no corpus folder: written before manifests recorded it, or embedded from a list
    file or TFDS data set). Logs which one and why; StoreError naming the folder when it is missing."""
    from lookalike.index.manifest import recorded_corpus

    served = recorded_corpus(served_manifest, store.root) if served_manifest is not None else None
    if config.corpus:
        corpus, why = Path(config.corpus).expanduser().resolve(), "given by --corpus"
    elif served is not None and _a_folder(served):
        corpus, why = Path(served), f"the corpus the served index {served_version} was embedded from"
    else:
        corpus = store.corpus_dir
        why = ("the store's default: nothing is served yet" if served_manifest is None else
               f"the store's default: the served index {served_version} was embedded from the pattern {served}"
               if served is not None else
               f"the store's default: the served index {served_version}'s manifest records no corpus folder")
    if not corpus.is_dir():
        hint = "" if config.corpus else "; pass --corpus FOLDER to use another"
        raise StoreError(f"corpus folder {corpus} ({why}) {not_a_folder(corpus)}{hint}")
    from lookalike.pipeline.reuse import corpus_is_store, store_as_corpus_error

    if corpus_is_store(str(corpus), store.root):  # refused before training, not after it by the embed
        raise StoreError(f"{store_as_corpus_error(str(corpus), store.root)} ({why})")
    log.info("corpus: %s (%s)", corpus, why)
    return corpus


def _a_folder(corpus: str) -> bool:
    """Whether a recorded corpus names a local folder (gone or not), not a glob pattern or a URL."""
    from lookalike.pipeline.sources import GLOB_CHARS

    return "://" not in corpus and Path(corpus).is_absolute() and (
        Path(corpus).is_dir() or not any(ch in corpus for ch in GLOB_CHARS))


def resolve_train_config(config: ReindexConfig, current_model_dir: Path | None) -> TrainConfig:
    """``config.train`` if given, else the served model's own config (from its model.json,
    so the candidate has its architecture and can warm-start), else the digits preset;
    ``config.train_overrides`` applied to the latter two."""
    from lookalike.model.artifact import read_model_meta
    from lookalike.model.config import apply_overrides, config_from_dict, get_config

    if config.train is not None:
        log.info("training config: as given (--config)%s, not the served model's",
                 f", with {' '.join(config.train_overrides)}" if config.train_overrides else "")
        return config.train
    if current_model_dir is not None:
        base, source = config_from_dict(read_model_meta(current_model_dir)["config"]), f"served model {current_model_dir.name}"
    else:
        base, source = get_config("digits"), "preset digits (no served model)"
    log.info("training config: %s%s", source, f", with {' '.join(config.train_overrides)}" if config.train_overrides else "")
    return apply_overrides(base, list(config.train_overrides))


def unlabelled_reason(store: Store, corpus: Path, served_model: str | None, asked: bool) -> str:
    """Why reindex does not train an unlabelled model, and the commands that keep such a store
    current: it judges a candidate on held-out images by their class folders, which an
    unlabelled corpus does not have (its folders are years, trips, devices: not classes)."""
    whose = "the training config asks for" if asked else f"the served model {served_model} was trained with"
    return (f"{whose} unlabelled=true (`train --unlabelled`), and reindex judges a candidate by class "
            f"sub-folders, which an unlabelled corpus does not have: the nightly line for this store is "
            f"`lookalike embed --workdir {store.root} --corpus {corpus} --incremental --keep 5` (new and changed files "
            f"embedded with the served model); retrain by hand with `lookalike train --unlabelled`, then "
            f"`lookalike embed`, or run reindex with --config PRESET to train a labelled model from the "
            f"corpus's class sub-folders")


def served_train_config(workdir: str) -> TrainConfig | None:
    """The training config of the model CURRENT serves in the store at ``workdir``, or None
    when there is none or it cannot be read (reindex itself then says why, with its remedy).
    Cheap: reads CURRENT, the index manifest and the model's model.json, nothing else."""
    from lookalike.model.artifact import read_model_meta
    from lookalike.model.config import config_from_dict
    from lookalike.pipeline.versions import served_manifest

    try:
        store = Store.at(workdir)
        served = served_manifest(store)
        if served is None:
            return None
        return config_from_dict(read_model_meta(store.model_dir(served[1]["model_version"]))["config"])
    except Exception as e:  # noqa: BLE001 - a usage check only; the run reports a broken store
        log.debug("served model's config not read from %s: %s", workdir, e)
        return None


def resolve_metadata(config: ReindexConfig, current_index, current_version: str | None) -> str | None:
    """The metadata file this run joins: ``config.metadata``, else the one the served index
    joined (a cron line written once keeps the tags and filters), none with ``no_metadata``.
    Checked before training, so a bad or missing file fails the run before its longest step."""
    from lookalike.pipeline.metadata import MetadataError, prepare_metadata

    if config.no_metadata:
        if config.metadata:
            raise ValueError(f"metadata {config.metadata!r} and no_metadata both given: choose one")
        return None
    served = ((current_index.manifest.get("metadata") or {}).get("path") if current_index is not None else None)
    if config.metadata is None and served:
        log.info("item metadata: %s, as the served index %s joins (--no-metadata drops it)", served, current_version)
        try:
            prepare_metadata(served, announce=False)  # the embed step logs what it joins
        except MetadataError as e:
            raise StoreError(f"the served index {current_version} joins item metadata from {served}, which cannot be "
                             f"used now ({e}): pass --metadata FILE to join another file, or --no-metadata to publish "
                             "without metadata") from e
        return served
    if config.metadata is not None:
        prepare_metadata(config.metadata, announce=False)  # names the file and the reason
    return config.metadata
