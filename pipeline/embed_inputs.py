"""What an embed run reads, settled before anything is written: its settings checked, its
corpus resolved (a folder, a glob pattern, a list file or a TFDS data set, made absolute),
named as the user named it in messages, and recorded in the index manifest's ``source``.
Each mistake is an error naming the input and what to pass instead.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lookalike.index.builder import resolve_options
from lookalike.model.store import Store, StoreError
from lookalike.pipeline.graph import EmbedConfig, EmbedRun
from lookalike.pipeline.reuse import corpus_is_store, store_as_corpus_error
from lookalike.pipeline.sources import (
    GLOB_CHARS,
    absolute_pattern,
    common_folder,
    literal_folder,
    read_list_file,
)
from lookalike.pipeline.tfds_source import TfdsSpec


def source_name(run: EmbedRun) -> str:
    """What the run reads, as the user named it: a TFDS data set, a list file, or a corpus pattern."""
    if run.config.tfds:
        return f"TFDS data set {run.config.tfds}"
    if run.config.list_file:
        return f"the files listed in {run.config.list_file}"
    folder = literal_folder(run.pattern)  # a folder as the user named it, not its escaped pattern
    return f"{folder}/**" if folder is not None and "://" not in folder else run.pattern


def validate_embed_config(config: EmbedConfig) -> None:
    """ValueError naming the setting, before anything is written."""
    for name in ("num_workers", "max_batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    for name in ("num_shards", "decode_threads"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    if sum(bool(x) for x in (config.corpus, config.list_file, config.tfds)) > 1:
        raise ValueError("give one source: a corpus, a list file or a TFDS data set")
    if config.keep_versions is not None and (config.keep_versions < 1 or not config.publish):
        raise ValueError(f"keep_versions must be at least 1, got {config.keep_versions}" if config.keep_versions < 1 else
                         "keep_versions prunes after publishing: it cannot go with publish=False (--no-publish)")
    resolve_options(1, replace(config.index, num_shards=1), warn=False)  # the index options (target recall, mode, ...)


def resolve_corpus(config: EmbedConfig, store: Store) -> tuple[EmbedConfig, str]:
    """The config with an absolute list file, and the corpus folder or pattern (TFDS: its uri root)."""
    corpus = config.corpus or str(store.corpus_dir)
    if config.tfds:
        return config, TfdsSpec.parse(config.tfds, config.tfds_data_dir).root
    if config.list_file:
        list_file = config.list_file if "://" in config.list_file else str(Path(config.list_file).resolve())
        if "://" not in list_file and Path(list_file).is_dir():
            raise StoreError(f"list file {config.list_file} is a folder: pass it as --corpus {config.list_file}, or "
                             "give --list-file a text file with one path per line")
        if "://" not in list_file and not Path(list_file).is_file():
            raise StoreError(f"list file {config.list_file} does not exist")
        listed = read_list_file(list_file)  # ids are relative to the listed files' common folder
        return replace(config, list_file=list_file), common_folder(listed) if listed else list_file.rsplit("/", 1)[0]
    if "://" in corpus:
        return config, corpus
    if corpus_is_store(corpus, store.root):
        raise StoreError(store_as_corpus_error(corpus, store.root))
    if Path(corpus).expanduser().is_dir():  # an existing folder is never a pattern, whatever its name holds
        return config, str(Path(corpus).expanduser().resolve())
    if any(ch in corpus for ch in GLOB_CHARS):
        return config, absolute_pattern(corpus)  # made absolute, as a relative folder is
    if Path(corpus).expanduser().exists():
        folder = Path(corpus).expanduser().resolve().parent
        raise StoreError(f"corpus {corpus} is a file, not a folder: pass its folder (--corpus {folder}), or list the "
                         "files to embed in a text file passed as --list-file")
    if config.corpus:  # the user named it: the path it names, without a hint to pass what they passed
        raise StoreError(f"corpus folder {Path(corpus).expanduser().resolve()} does not exist")
    raise StoreError(missing_default_corpus(store))


def missing_default_corpus(store: Store) -> str:
    """Why embed without --corpus cannot run when ``DIR/corpus`` is missing, and what to pass.
    A store whose CURRENT index was embedded from another folder is named first: ``lookalike
    demo`` would write the digits into ``DIR/corpus`` and publish them over that index."""
    from lookalike.index.manifest import current_corpus

    served = current_corpus(store)
    if served is not None and Path(served) != store.corpus_dir:
        return (f"corpus folder {store.corpus_dir} (the default) does not exist: pass --corpus FOLDER; the served "
                f"index {store.current_index_or_none()} was embedded from {served} (--corpus {served} embeds that "
                "folder again)")
    return (f"corpus folder {store.corpus_dir} (the default) does not exist: pass --corpus FOLDER (or, for a new "
            f"store, `lookalike demo --workdir {store.root}` writes the digits demo corpus there)")


def embed_source(config: EmbedConfig, pattern: str, root: Path) -> dict[str, str]:
    """What a run embeds, recorded in its index's manifest (``source``): the corpus folder (or
    pattern; relative to the store ``root`` when inside it) a later reindex defaults to, else
    the list file or TFDS data set."""
    from lookalike.index.manifest import corpus_source

    if config.tfds:
        return {"tfds": config.tfds}
    if config.list_file:
        return {"list_file": config.list_file}
    return corpus_source(literal_folder(pattern) or pattern, root)
