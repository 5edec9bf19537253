"""Sidecar metadata for the embed job: ``--metadata FILE`` joins user columns onto the items.

FILE is JSONL, CSV or Parquet (by its extension), one row per item, with an ``id`` column
holding the ids the pipeline gives items (paths relative to the corpus folder, e.g.
``3/digit_0042.png``). Every other column (``source``, ``tags``, anything) becomes a column
of the items table, of the embedding Parquet files and of the published index, so
``ItemIndex.search(where=...)`` and the server's filters can use it. A row whose id is a
video's id applies to every frame of that video (frames carry the video id in ``group``);
a row for a frame's own id (``clips/a.mp4#t=2.000``, or ``#t=2``: seconds written any way, as
the server takes them) wins over its video's. Items without a
row get nulls. ``tags`` is always ``list<string>``: a JSON list in JSONL and Parquet, a
``;``-separated string (in CSV, or anywhere) split, trimmed and without empty parts.

The driver reads and checks the file once before anything is written
(``prepare_metadata``: errors name the file and the reason) and records its sha256; each
worker reads it again by path, once per process (``load_metadata``, refusing a file whose
bytes changed since), and joins it onto each shard's items table after the shard's tables
are concatenated and sorted (``with_metadata``): one hash lookup of the shard's ids in the
metadata ids and one ``take`` per column, for new and cached (``--incremental``) items alike.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lookalike.pipeline.items import ITEM_FIELDS, concat_sorted
from lookalike.pipeline.video import canonical_frame_id

log = logging.getLogger(__name__)

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
TAGS = "tags"
TAG_SEPARATOR = ";"
# Columns an item already has, and the fields a search result shows: a metadata column may be none of these.
RESERVED_COLUMNS = frozenset([name for name, _ in ITEM_FIELDS] + [
    "embedding", "score", "distance", "same_item", "thumbnail_url", "similar_url"])
UNMATCHED_SHOWN = 5


class MetadataError(ValueError):
    """The metadata file cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class MetadataSpec:
    """Which metadata file a run joins: its absolute path and the sha256 of its bytes."""

    path: str
    sha256: str
    rows: int
    columns: tuple[str, ...]  # the columns it adds (all but ``id``)

    def record(self) -> dict[str, Any]:
        """What the run summary and the index manifest record."""
        return {"path": self.path, "sha256": self.sha256, "rows": self.rows, "columns": list(self.columns)}


_loaded: dict[tuple[str, str], pa.Table] = {}  # (path, sha256) -> metadata table, per process
_lock = threading.Lock()
LOADED_KEPT = 4  # metadata tables a process keeps (a long-lived process runs many embed jobs)


def _remember(key: tuple[str, str], table: pa.Table) -> pa.Table:
    """Keep ``table`` for ``key`` (caller holds ``_lock``), forgetting the oldest beyond LOADED_KEPT."""
    _loaded.pop(key, None)
    _loaded[key] = table
    while len(_loaded) > LOADED_KEPT:
        _loaded.pop(next(iter(_loaded)))
    return table


def prepare_metadata(path: str, *, announce: bool = True) -> MetadataSpec:
    """Read and check ``path`` (on the driver, before the run writes anything); MetadataError
    naming the file and the reason if it cannot be used. ``announce``: log its rows and
    columns (a check ahead of the step that joins it, which logs them, does not)."""
    path = path if "://" in path else os.path.abspath(os.path.expanduser(path))
    data = _read_bytes(path)
    sha256 = hashlib.sha256(data).hexdigest()
    table = parse_metadata(data, path)
    with _lock:
        _remember((path, sha256), table)
    spec = MetadataSpec(path, sha256, table.num_rows, tuple(n for n in table.column_names if n != "id"))
    log.log(logging.INFO if announce else logging.DEBUG, "metadata %s: %d row(s), column(s) %s (sha256 %s)", path,
            spec.rows, ", ".join(spec.columns) or "none", sha256[:12])
    return spec


def load_metadata(spec: MetadataSpec) -> pa.Table:
    """The metadata table of ``spec``, read from its path once per process; MetadataError if
    the file's bytes are no longer those the run started with."""
    key = (spec.path, spec.sha256)
    with _lock:
        table = _loaded.get(key)
        if table is not None:
            return table
        data = _read_bytes(spec.path)
        actual = hashlib.sha256(data).hexdigest()
        if actual != spec.sha256:
            raise MetadataError(f"metadata file {spec.path} changed while the run was going on (sha256 {actual[:12]}, "
                                f"expected {spec.sha256[:12]}): run again")
        return _remember(key, parse_metadata(data, spec.path))


def _read_bytes(path: str) -> bytes:
    if "://" in path:
        from apache_beam.io.filesystems import FileSystems

        try:
            with FileSystems.open(path) as f:
                return f.read()
        except Exception as e:  # Beam wraps errors of every filesystem its own way
            raise MetadataError(f"metadata file {path} cannot be read: {e}") from None
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise MetadataError(f"metadata file {path} does not exist") from None
    except IsADirectoryError:
        raise MetadataError(f"metadata file {path} is a folder, not a file") from None


def parse_metadata(data: bytes, path: str) -> pa.Table:
    """The bytes of a metadata file -> its checked table: ``id`` (string, unique, non-empty)
    first, then the columns it adds (``tags`` as list<string>)."""
    suffix = os.path.splitext(path)[1].lower()
    fmt = FORMATS.get(suffix)
    if fmt is None:
        raise MetadataError(f"metadata file {path}: unknown extension {suffix or '(none)'!r}; use "
                            f"{', '.join(sorted(FORMATS))} (JSON lines, CSV or Parquet)")
    if fmt == "jsonl":
        table, where = _read_jsonl(data, path)
    elif fmt == "csv":
        table, where = _read_csv(data, path), _data_row
    else:
        table, where = _read_parquet(data, path), _data_row
    return _checked(table, path, where)


def _data_row(i: int) -> str:
    return f"data row {i + 1}"


def _read_jsonl(data: bytes, path: str):
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetadataError(f"metadata file {path} line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise MetadataError(f"metadata file {path} line {number}: expected a JSON object, got {type(row).__name__}")
        if not isinstance(row.get("id"), str) or not row["id"]:
            raise MetadataError(f"metadata file {path} line {number}: 'id' must be a non-empty string, got "
                                f"{row.get('id')!r}")
        rows.append(row)
        lines.append(number)
    names = list(dict.fromkeys(name for row in rows for name in row))
    columns = []
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns.append(pa.array(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as e:
            raise MetadataError(f"metadata file {path}: column {name!r} mixes values of different types ({e})") from None
    table = pa.table(dict(zip(names, columns))) if names else pa.table({"id": pa.array([], pa.string())})
    return table, lambda i: f"line {lines[i]}"


def _read_csv(data: bytes, path: str) -> pa.Table:
    from pyarrow import csv

    options = csv.ConvertOptions(column_types={"id": pa.string(), TAGS: pa.string()}, strings_can_be_null=True)
    delimiter = csv_delimiter(data)
    if delimiter != ",":
        log.info("metadata file %s: columns separated by %r (the split of its header that gives an id column)",
                 path, delimiter)
    try:
        return csv.read_csv(io.BytesIO(data), parse_options=csv.ParseOptions(delimiter=delimiter),
                            convert_options=options)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise MetadataError(f"metadata file {path}: not a readable CSV file ({e})") from None


# Delimiters a spreadsheet may write instead of commas (Excel in locales with a decimal comma: ';').
OTHER_CSV_DELIMITERS = (";", "\t")


def csv_delimiter(data: bytes) -> str:
    """The delimiter of a CSV file: a comma, unless its header (the first non-blank line,
    quotes respected) has no field ``id`` when split at commas but has one when split at ';'
    or at tabs (a header ``id;"price, EUR"``)."""
    import csv

    text = data.removeprefix(b"\xef\xbb\xbf")[:65536].decode("utf-8", errors="replace")
    header = next((line for line in text.splitlines() if line.strip()), "")
    for delimiter in (",", *OTHER_CSV_DELIMITERS):
        if "id" in next(csv.reader([header], delimiter=delimiter), []):
            return delimiter
    return ","


def _read_parquet(data: bytes, path: str) -> pa.Table:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
        raise MetadataError(f"metadata file {path}: not a readable Parquet file ({e})") from None


def _checked(table: pa.Table, path: str, where) -> pa.Table:
    """``table`` with ``id`` checked and first, ``tags`` as list<string>, null-typed columns
    as strings, every column one chunk; MetadataError naming the problem."""
    if "id" not in table.column_names:
        raise MetadataError(f"metadata file {path} has no 'id' column (columns: {', '.join(table.column_names) or 'none'})")
    reserved = sorted(set(table.column_names) & RESERVED_COLUMNS - {"id"})
    if reserved:
        raise MetadataError(f"metadata file {path}: column(s) {', '.join(map(repr, reserved))} collide with the items' "
                            f"built-in fields ({', '.join(sorted(RESERVED_COLUMNS))}): rename them")
    unnamed = [i for i, name in enumerate(table.column_names) if not name.strip()]
    if unnamed:  # a CSV header ending in a comma, a JSON key "": no filter or page could name it
        raise MetadataError(f"metadata file {path}: column {unnamed[0] + 1} has no name (columns: "
                            f"{', '.join(map(repr, table.column_names))}): name it or remove it")
    if len(set(table.column_names)) != len(table.column_names):
        raise MetadataError(f"metadata file {path}: a column name appears twice ({', '.join(table.column_names)})")
    ids = table.column("id")
    if pa.types.is_dictionary(ids.type):
        ids = ids.cast(ids.type.value_type)
    if pa.types.is_null(ids.type) and not len(ids):
        ids = pa.chunked_array([], pa.string())
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        raise MetadataError(f"metadata file {path}: the 'id' column must hold strings (item ids such as "
                            f"'3/digit_0042.png'), it holds {ids.type}")
    ids = ids.cast(pa.string()).combine_chunks()
    empty = pc.fill_null(pc.equal(ids, ""), True).to_numpy(zero_copy_only=False)
    if empty.any():
        raise MetadataError(f"metadata file {path} {where(int(np.flatnonzero(empty)[0]))}: empty 'id'")
    ids = _canonical_frame_ids(ids)
    _refuse_duplicates(ids, path, where)
    columns = {"id": ids}
    for name in table.column_names:
        if name == "id":
            continue
        column = table.column(name).combine_chunks()
        if name == TAGS:
            column = _as_tags(column, path)
        elif pa.types.is_null(column.type):
            column = column.cast(pa.string())  # every value missing: typed, so shards agree
        columns[name] = column
    return pa.table(columns)


def _canonical_frame_ids(ids: pa.Array) -> pa.Array:
    """[N] ids with frame ids written as the pipeline writes them (``clip.mp4#t=1.2`` ->
    ``clip.mp4#t=1.200``, as the server accepts them); only ids holding ``#t=`` are looked at."""
    frames = np.flatnonzero(pc.match_substring(ids, "#t=").to_numpy(zero_copy_only=False))
    if not len(frames):
        return ids
    values = ids.to_pylist()
    for i in frames:
        values[i] = canonical_frame_id(values[i])
    return pa.array(values, pa.string())


def _refuse_duplicates(ids: pa.Array, path: str, where) -> None:
    if len(pc.unique(ids)) == len(ids):
        return
    order = pc.sort_indices(ids).to_numpy()  # stable: equal ids keep their file order
    sorted_ids = ids.take(pa.array(order))
    same = pc.equal(sorted_ids.slice(1), sorted_ids.slice(0, len(ids) - 1)).to_numpy(zero_copy_only=False)
    first = int(np.flatnonzero(same)[0])
    a, b = sorted((int(order[first]), int(order[first + 1])))
    raise MetadataError(f"metadata file {path}: duplicate id {sorted_ids[first].as_py()!r} ({where(a)} and {where(b)}): "
                        "give each item one row")


def _as_tags(column: pa.Array, path: str) -> pa.Array:
    """A tags column as list<string>: a string is split at ';' (parts trimmed, empty ones
    dropped); a list of strings is kept; a missing value stays null."""
    value_type = column.type
    if pa.types.is_null(value_type):
        return pa.nulls(len(column), pa.list_(pa.string()))
    if pa.types.is_dictionary(value_type):
        column, value_type = column.cast(value_type.value_type), value_type.value_type
    if pa.types.is_string(value_type) or pa.types.is_large_string(value_type):
        parts = pc.split_pattern(column.cast(pa.string()), TAG_SEPARATOR)
        values = pc.utf8_trim_whitespace(pc.list_flatten(parts))
        keep = pc.not_equal(values, "")
        parents = pc.list_parent_indices(parts).filter(keep).to_numpy(zero_copy_only=False)
        offsets = np.concatenate([[0], np.cumsum(np.bincount(parents, minlength=len(column)))]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), values.filter(keep), mask=column.is_null())
    if pa.types.is_list(value_type) or pa.types.is_large_list(value_type):
        element = value_type.value_type
        if pa.types.is_null(element) or pa.types.is_string(element) or pa.types.is_large_string(element):
            return column.cast(pa.list_(pa.string()))
    raise MetadataError(f"metadata file {path}: 'tags' must be a list of strings or a '{TAG_SEPARATOR}'-separated "
                        f"string, not {value_type}")


def item_keys(items: pa.Table) -> tuple[pa.Array, pa.Array]:
    """([N] ids, [N] groups) of an items table, as single string arrays (groups null for images)."""
    ids = items.column("id").combine_chunks().cast(pa.string())
    groups = items.column("group").combine_chunks().cast(pa.string()) if "group" in items.column_names \
        else pa.nulls(len(ids), pa.string())
    return ids, groups


def _all_ascii(*arrays: pa.Array) -> bool:
    return all(pc.all(pc.fill_null(pc.string_is_ascii(a), True)).as_py() is not False for a in arrays)


def _nfc(strings: pa.Array) -> pa.Array:
    """Unicode strings in one normal form (NFC): a name macOS wrote decomposed (NFD, ``e`` and
    a combining accent) equals the same name typed composed."""
    return pc.utf8_normalize(strings, form="NFC")


def join_metadata(items: pa.Table, metadata: pa.Table) -> pa.Table:
    """``items`` with the metadata columns appended: row i gets the metadata row whose id is
    its id, else the one whose id is its group (a frame's video), else nulls; ids are also
    matched in Unicode's NFC form (a macOS file name in NFD against a typed one). One hash
    lookup per key column and one ``take`` per metadata column; no Python per item."""
    ids, groups = item_keys(items)
    value_set = metadata.column("id").combine_chunks()
    by_form = not _all_ascii(ids, groups, value_set)  # a name in NFD (macOS) against one typed in NFC: the same name
    nfc_set = _nfc(value_set) if by_form else None
    lookups = []
    for keys in (ids, groups):  # its own id first, exactly then in NFC, then its video's
        lookups.append(pc.index_in(keys, value_set=value_set))
        if by_form:
            lookups.append(pc.index_in(_nfc(keys), value_set=nfc_set))
    positions = pc.coalesce(*lookups)
    extra = metadata.drop(["id"]).take(positions)
    for name, column in zip(extra.column_names, extra.columns):
        items = items.append_column(pa.field(name, column.type), column)
    return items


def with_metadata(tables: list[pa.Table], schema: pa.Schema, metadata: MetadataSpec | None) -> pa.Table:
    """One shard's item tables -> its table: concatenated, sorted by id, and with the
    metadata columns joined when the run has a metadata file."""
    table = concat_sorted(tables, schema)
    return join_metadata(table, load_metadata(metadata)) if metadata is not None else table


def unmatched_ids(metadata: pa.Table, items: pa.Table) -> pa.Array:
    """The metadata ids that are neither an item's id nor a video's id (``items``: at least
    ``id`` and ``group``), in file order."""
    ids, groups = item_keys(items)
    known = pa.concat_arrays([ids, groups.drop_null()])
    meta_ids = metadata.column("id").combine_chunks()
    exact = pc.is_in(meta_ids, value_set=known)
    if _all_ascii(known, meta_ids):
        return meta_ids.filter(pc.invert(exact))
    # Matched in NFC only, unless another row matches that item exactly and takes it (join_metadata).
    meta_nfc = _nfc(meta_ids)
    by_form = pc.and_(pc.is_in(meta_nfc, value_set=_nfc(known)),
                      pc.invert(pc.is_in(meta_nfc, value_set=meta_nfc.filter(exact))))
    return meta_ids.filter(pc.invert(pc.or_(exact, by_form)))


def report_unmatched(spec: MetadataSpec, items: pa.Table) -> int:
    """Log a warning when metadata ids match no item (the count and the first few); returns the count."""
    unmatched = unmatched_ids(load_metadata(spec), items)
    if len(unmatched):
        shown = ", ".join(repr(i) for i in unmatched.slice(0, UNMATCHED_SHOWN).to_pylist())
        example = next((i for i in items.column("id").slice(0, 1).to_pylist() if i), "3/digit_0042.png")  # one of this corpus
        log.warning("metadata file %s: %d of %d id(s) match no item (e.g. %s%s); ids are paths relative to the corpus "
                    "folder, like %r, or a video's path for all its frames", spec.path, len(unmatched),
                    spec.rows, shown, ", ..." if len(unmatched) > UNMATCHED_SHOWN else "", example)
    return len(unmatched)


__all__ = [
    "RESERVED_COLUMNS",
    "MetadataError",
    "MetadataSpec",
    "join_metadata",
    "load_metadata",
    "parse_metadata",
    "prepare_metadata",
    "report_unmatched",
    "unmatched_ids",
    "with_metadata",
]
