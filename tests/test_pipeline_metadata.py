"""Sidecar item metadata (``embed --metadata FILE``): reading and checking the file, the join
onto items, and whole embed runs on the in-process runner that filter on it."""

import json
import logging
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lookalike.index.searcher import ItemIndex
from lookalike.model.data import list_images
from lookalike.pipeline.embed import EmbedConfig, read_embeddings, run_embed
from lookalike.pipeline.metadata import MetadataError, join_metadata, parse_metadata, unmatched_ids


def parse(text: str, name: str) -> pa.Table:
    return parse_metadata(text.encode(), f"/data/{name}")


def test_jsonl_csv_and_parquet_give_the_same_table(tmp_path):
    jsonl = parse('{"id": "a.png", "source": "scan", "tags": ["cat", "red"], "year": 2001}\n\n'
                  '{"id": "b.png", "tags": []}\n{"id": "c.png", "source": "web", "tags": null}\n', "m.jsonl")
    csv = parse("id,source,tags,year\na.png,scan, cat ;red;,2001\nb.png,,;,\nc.png,web,,\n", "m.csv")
    assert jsonl.column_names == csv.column_names == ["id", "source", "tags", "year"]
    assert jsonl.column("tags").type == csv.column("tags").type == pa.list_(pa.string())
    assert jsonl.to_pylist() == csv.to_pylist() == [
        {"id": "a.png", "source": "scan", "tags": ["cat", "red"], "year": 2001},
        {"id": "b.png", "source": None, "tags": [], "year": None},
        {"id": "c.png", "source": "web", "tags": None, "year": None},
    ]
    pq.write_table(jsonl, tmp_path / "m.parquet")
    assert parse_metadata((tmp_path / "m.parquet").read_bytes(), "m.parquet").equals(jsonl)
    string_tags = parse('{"id": "a.png", "tags": "x; y"}\n', "m.ndjson")  # a ';'-separated string anywhere
    assert string_tags.column("tags").to_pylist() == [["x", "y"]]


def test_a_csv_separated_by_semicolons_or_tabs_is_read_by_its_header():
    """Excel in a locale with a decimal comma writes ';' between columns: the header has no
    comma, so its delimiter is taken from it; a quoted field may still hold ';' tags."""
    commas = parse('id,source,tags\na.png,scan,"cat;red"\nb.png,"web, old",\n', "m.csv")
    semicolons = parse('\ufeffid;source;tags\r\na.png;scan;"cat;red"\r\nb.png;web, old;\r\n', "m.csv")
    tabs = parse('"id"\tsource\ttags\na.png\tscan\tcat;red\nb.png\tweb, old\t\n', "m.csv")
    assert commas.to_pylist() == semicolons.to_pylist() == tabs.to_pylist() == [
        {"id": "a.png", "source": "scan", "tags": ["cat", "red"]},
        {"id": "b.png", "source": "web, old", "tags": None},
    ]
    one_column = parse('id\na.png\n', "m.csv")  # no delimiter to find: commas, as ever
    assert one_column.to_pylist() == [{"id": "a.png"}]
    quoted = [parse('id;"price, EUR";tags\na.png;"3,5";x\n', "m.csv"),  # a quoted comma in the header
              parse('\r\n\nid;price, EUR;tags\r\na.png;"3,5";x\r\n', "m.csv"),  # blank lines first
              parse('id\tprice, EUR\ttags\na.png\t3,5\tx\n', "m.csv")]
    assert [t.to_pylist() for t in quoted] == [[{"id": "a.png", "price, EUR": "3,5", "tags": ["x"]}]] * 3
    with pytest.raises(MetadataError, match="no 'id' column"):  # a header naming no id column is no guess
        parse('name;source\na.png;scan\n', "m.csv")


@pytest.mark.parametrize("name, text, message", [
    ("m.txt", "id\n", r"/data/m.txt: unknown extension '.txt'; use .csv, .jsonl, .ndjson, .parquet, .pq"),
    ("m.jsonl", '{"id": "a"}\n{"id": "b",}\n', r"/data/m.jsonl line 2: not valid JSON"),
    ("m.jsonl", '{"id": "a"}\n\n["b"]\n', r"/data/m.jsonl line 3: expected a JSON object, got list"),
    ("m.jsonl", '{"id": 3}\n', r"/data/m.jsonl line 1: 'id' must be a non-empty string, got 3"),
    ("m.jsonl", '{"id": "a", "n": 1}\n{"id": "b", "n": "x"}\n', r"column 'n' mixes values of different types"),
    ("m.csv", "name,tags\na.png,x\n", r"/data/m.csv has no 'id' column \(columns: name, tags\)"),
    ("m.csv", "id,source\na.png,x\nb.png,y\na.png,z\n", r"duplicate id 'a.png' \(data row 1 and data row 3\)"),
    ("m.jsonl", '{"id": "a"}\n{"id": "b"}\n{"id": "a"}\n', r"duplicate id 'a' \(line 1 and line 3\)"),
    ("m.csv", "id,kind,uri\na.png,x,y\n", r"column\(s\) 'kind', 'uri' collide with the items' built-in fields"),
    ("m.jsonl", '{"id": "a", "embedding": [1]}\n', r"column\(s\) 'embedding' collide"),
    ("m.csv", "id,source\na.png,x\n,y\n", r"/data/m.csv data row 2: empty 'id'"),
    ("m.jsonl", '{"id": "a", "": 3}\n', r"/data/m.jsonl: column 2 has no name \(columns: 'id', ''\): name it"),
    ("m.csv", "id, \na.png,x\n", r"/data/m.csv: column 2 has no name"),
    ("m.csv", "id,source\na.png,x,extra\n", r"/data/m.csv: not a readable CSV file"),
    ("m.parquet", "not parquet", r"/data/m.parquet: not a readable Parquet file"),
    ("m.jsonl", '{"id": "a", "tags": [1, 2]}\n', r"'tags' must be a list of strings or a ';'-separated string, not list<item: int64>"),
])
def test_unusable_metadata_files_are_refused_naming_the_file_and_the_reason(name, text, message):
    with pytest.raises(MetadataError, match=message):
        parse(text, name)


def test_a_parquet_id_column_must_hold_strings(tmp_path):
    pq.write_table(pa.table({"id": [1, 2]}), tmp_path / "m.parquet")
    with pytest.raises(MetadataError, match=r"the 'id' column must hold strings .* it holds int64"):
        parse_metadata((tmp_path / "m.parquet").read_bytes(), str(tmp_path / "m.parquet"))


def test_workers_read_the_file_by_path_and_refuse_one_changed_since_the_run_began(tmp_path):
    from lookalike.pipeline import metadata as module

    path = write_jsonl(tmp_path / "m.jsonl", [{"id": "a.png", "tags": ["x"]}])
    spec = module.prepare_metadata(str(path))
    assert (spec.path, spec.rows, spec.columns) == (str(path), 1, ("tags",))
    module._loaded.clear()  # as in a worker process, which has not read it yet
    assert module.load_metadata(spec).column("tags").to_pylist() == [["x"]]
    module._loaded.clear()
    write_jsonl(path, [{"id": "a.png", "tags": ["y"]}])
    with pytest.raises(MetadataError, match=rf"metadata file {path} changed while the run was going on"):
        module.load_metadata(spec)


def test_the_join_gives_frames_their_videos_row_and_others_nulls():
    items = pa.table({"id": ["a.png", "v.mp4#t=0.000", "v.mp4#t=2.000", "w.mp4#t=0.000", "z.png"],
                      "group": [None, "v.mp4", "v.mp4", "w.mp4", None]})
    metadata = parse('{"id": "v.mp4", "source": "camera", "tags": ["street"]}\n'
                     '{"id": "v.mp4#t=2.000", "source": "frame row", "tags": ["night"]}\n'
                     '{"id": "a.png", "source": "scan"}\n{"id": "gone.png", "source": "x"}\n', "m.jsonl")
    joined = join_metadata(items, metadata)
    assert joined.column_names == ["id", "group", "source", "tags"]
    assert joined.column("source").to_pylist() == ["scan", "camera", "frame row", None, None]
    assert joined.column("tags").to_pylist() == [None, ["street"], ["night"], None, None]
    assert unmatched_ids(metadata, items).to_pylist() == ["gone.png"]
    empty = join_metadata(items.slice(0, 0), metadata)
    assert empty.schema == joined.schema and empty.num_rows == 0


def test_ids_match_across_unicode_normal_forms_an_exact_match_first():
    """macOS writes file names decomposed (NFD: 'e' + U+0301); a metadata file typed by hand
    holds them composed (NFC). Both name the same file; where both spellings are rows, each
    item takes its own."""
    nfd, nfc = "cafe\u0301.png", "caf\u00e9.png"
    items = pa.table({"id": [nfd, "r\u00e9sum\u00e9.mp4#t=0.000", "plain.png"], "group": [None, "r\u00e9sum\u00e9.mp4", None]})
    metadata = parse(f"id,source\n{nfc},typed\nre\u0301sume\u0301.mp4,video row\nplain.png,p\nno\u00ebl.png,x\n", "m.csv")
    assert join_metadata(items, metadata).column("source").to_pylist() == ["typed", "video row", "p"]
    assert unmatched_ids(metadata, items).to_pylist() == ["no\u00ebl.png"]
    both = parse(f"id,source\n{nfc},composed\n{nfd},decomposed\n", "m.csv")
    two = pa.table({"id": [nfc, nfd], "group": [None, None]})
    assert join_metadata(two, both).column("source").to_pylist() == ["composed", "decomposed"]
    assert unmatched_ids(both, two).to_pylist() == []
    one = pa.table({"id": [nfd], "group": [None]})  # the composed row is left unused: reported
    assert join_metadata(one, both).column("source").to_pylist() == ["decomposed"]
    assert unmatched_ids(both, one).to_pylist() == [nfc]


def test_frame_ids_are_matched_however_their_seconds_are_written():
    items = pa.table({"id": ["v.mp4#t=0.000", "v.mp4#t=1.200", "v.mp4#t=2.500"], "group": ["v.mp4"] * 3})
    metadata = parse("id,source\nv.mp4#t=1.2,one point two\nv.mp4#t=2.50,two and a half\nv.mp4#t=x,odd\n", "m.csv")
    assert metadata.column("id").to_pylist() == ["v.mp4#t=1.200", "v.mp4#t=2.500", "v.mp4#t=x"]
    assert join_metadata(items, metadata).column("source").to_pylist() == [None, "one point two", "two and a half"]
    assert unmatched_ids(metadata, items).to_pylist() == ["v.mp4#t=x"]
    with pytest.raises(MetadataError, match=r"duplicate id 'v.mp4#t=1.200'"):  # the same frame written twice
        parse('{"id": "v.mp4#t=1.2"}\n{"id": "v.mp4#t=1.200"}\n', "m.jsonl")


@pytest.fixture
def corpus_store(tmp_path, trained_store, digits_corpus):
    """A store with the trained model and two classes of digits (about 40 images)."""
    workdir = tmp_path / "w"
    shutil.copytree(trained_store.root / "models", workdir / "models")
    for label in ("1", "2"):
        shutil.copytree(digits_corpus / label, workdir / "corpus" / label)
    return workdir


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_embed_with_jsonl_metadata_filters_on_tags_and_source(corpus_store, tmp_path, make_video, caplog):
    corpus = corpus_store / "corpus"
    (corpus / "clips").mkdir()
    make_video(corpus / "clips" / "v.mp4", seconds=2.0, cut_at_s=1.0)
    ids = sorted(str(f.relative_to(corpus)) for f in list_images(corpus))
    ones = [i for i in ids if i.startswith("1/")]
    rows = [{"id": i, "source": "scanner" if i.startswith("1/") else "web", "tags": ["odd"] if i.startswith("1/") else []}
            for i in ids[::2]]
    rows[0]["tags"] = ["odd", "first"]
    rows.append({"id": "clips/v.mp4", "source": "camera", "tags": ["video"]})
    rows += [{"id": f"missing/{n}.png", "source": "x"} for n in range(7)]
    metadata = write_jsonl(tmp_path / "meta.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="lookalike.pipeline.metadata"):
        summary = run_embed(EmbedConfig(workdir=str(corpus_store), metadata=str(metadata)))
    warning = next(r.getMessage() for r in caplog.records if "match no item" in r.getMessage())
    assert "7 of" in warning and "'missing/0.png'" in warning and ", ..." in warning
    example = re.search(r"relative to the corpus folder, like '([^']+)'", warning).group(1)
    assert example in ids or example.startswith("clips/v.mp4#t="), warning  # an id of this corpus, as the example
    assert summary.metadata["path"] == str(metadata) and summary.metadata["unmatched_ids"] == 7
    assert summary.metadata["columns"] == ["source", "tags"] and len(summary.metadata["sha256"]) == 64
    assert json.loads((corpus_store / "embeddings" / summary.run / "summary.json").read_text())["metadata"] == summary.metadata
    index = ItemIndex.load(corpus_store / "indexes" / summary.index_version)
    assert index.manifest["metadata"]["sha256"] == summary.metadata["sha256"]
    by_id = {item["id"]: item for item in index.items}
    assert by_id[ids[0]]["tags"] == ["odd", "first"] and by_id[ids[1]]["tags"] is None and by_id[ids[1]]["source"] is None
    frames = [item for item in index.items if item["group"] == "clips/v.mp4"]
    assert frames and all(f["source"] == "camera" and f["tags"] == ["video"] for f in frames)
    query = index.embeddings[index.row_of(ids[1])]
    odd = index.search(query, k=100, where={"tags": "odd"})[0]
    assert sorted(n.id for n in odd) == sorted(r["id"] for r in rows if "odd" in (r.get("tags") or []))
    assert [n.id for n in index.search(query, k=5, where={"tags": "first"})[0]] == [ids[0]]
    web = index.search(query, k=100, where={"source": ["web", "camera"]})[0]
    assert {n.id for n in web} == {i for i in ids[::2] if not i.startswith("1/")} | {f["id"] for f in frames}
    both = index.search(query, k=100, where={"source": "scanner", "tags": "first"})[0]
    assert [n.id for n in both] == [ids[0]] and ids[0] in ones


def test_embed_with_csv_metadata_and_the_incremental_rule(corpus_store, tmp_path, caplog):
    ids = sorted(str(f.relative_to(corpus_store / "corpus")) for f in list_images(corpus_store / "corpus"))
    metadata = tmp_path / "meta.csv"
    metadata.write_text("id,source,tags\n" + "".join(f"{i},lab,blue; round\n" for i in ids[:3]) + "gone.png,lab,\n")
    first = run_embed(EmbedConfig(workdir=str(corpus_store), metadata=str(metadata), incremental=True))
    index = ItemIndex.load(corpus_store / "indexes" / first.index_version)
    assert index.manifest["metadata"] == first.metadata and first.metadata["unmatched_ids"] == 1  # as README says
    query = index.embeddings[index.row_of(ids[-1])]
    assert sorted(n.id for n in index.search(query, k=10, where={"tags": "round"})[0]) == ids[:3]
    assert sorted(n.id for n in index.search(query, k=10, where={"source": "lab"})[0]) == ids[:3]
    same = run_embed(EmbedConfig(workdir=str(corpus_store), metadata=str(metadata), incremental=True))
    assert same.index_version == first.index_version  # unchanged corpus and metadata: CURRENT kept
    metadata.write_text("id,source,tags\n" + "".join(f"{i},lab,red\n" for i in ids[:2]))
    changed = run_embed(EmbedConfig(workdir=str(corpus_store), metadata=str(metadata), incremental=True))
    assert changed.index_version != first.index_version and changed.embedded == 0  # nothing re-embedded
    assert (corpus_store / "CURRENT").read_text().strip() == changed.index_version
    index = ItemIndex.load(corpus_store / "indexes" / changed.index_version)
    assert sorted(n.id for n in index.search(query, k=10, where={"tags": "red"})[0]) == ids[:2]
    assert index.search(query, k=10, where={"tags": "round"})[0] == []
    emb_first, _ = read_embeddings(corpus_store / "embeddings" / first.run)
    emb_changed, items = read_embeddings(corpus_store / "embeddings" / changed.run)
    np.testing.assert_array_equal(emb_first, emb_changed)  # the reused items got the new metadata too
    assert items.column("tags").to_pylist()[:3] == [["red"], ["red"], None]
    again = run_embed(EmbedConfig(workdir=str(corpus_store), metadata=str(metadata), incremental=True))
    assert again.index_version == changed.index_version
    caplog.clear()
    dropped = run_embed(EmbedConfig(workdir=str(corpus_store), incremental=True))  # no metadata any more
    assert dropped.index_version != changed.index_version
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "joins none" in r.getMessage()]
    assert warned == [f"the served index {changed.index_version} joins item metadata from {metadata}; this run joins "
                      f"none, so the index it publishes has no metadata to filter on (pass --metadata {metadata} "
                      "to keep it)"]
    caplog.clear()
    run_embed(EmbedConfig(workdir=str(corpus_store), incremental=True))
    assert not [r for r in caplog.records if "joins none" in r.getMessage()]  # the served index has none now
    assert "tags" not in ItemIndex.load(corpus_store / "indexes" / dropped.index_version).items.schema.names


def test_a_bad_metadata_file_fails_the_command_before_anything_is_written(corpus_store, tmp_path, capsys):
    from lookalike.pipeline.cli import main

    bad = write_jsonl(tmp_path / "meta.jsonl", [{"id": "1/a.png"}, {"id": "1/a.png"}])
    code = main(["embed", "--workdir", str(corpus_store), "--metadata", str(bad), "--run-name", "r"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1] == (f"lookalike embed: error: metadata file {bad}: duplicate id '1/a.png' "
                                     "(line 1 and line 2): give each item one row"), err
    code = main(["embed", "--workdir", str(corpus_store), "--metadata", str(tmp_path / "none.csv"), "--run-name", "r"])
    assert code == 1 and capsys.readouterr().err.strip().endswith(f"metadata file {tmp_path / 'none.csv'} does not exist")
    assert not (corpus_store / "embeddings" / "r").exists() and not (corpus_store / "CURRENT").exists()
