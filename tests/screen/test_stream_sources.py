"""Streaming sources (open_samples): the same samples as load_samples from every format, chunks,
fetch, copies written by reading the input again (verbatim lines, BOM, CRLF, CSV rows, parquet
rows, Dataset.select), and a file that changes between passes."""

import csv
import json

import pytest

from guard.core.data import DataFileError
from guard.screen.samples import (MAX_SKIPPED_MESSAGES, FieldNames, SampleStream, dataset_stream, load_samples,
                                  open_samples)

BOM = "\ufeff"


def records(n):
    return [{"id": f"s{i}", "messages": [{"role": "user", "content": f"Is plan {i} good?\u2028Really?"},
                                         {"role": "assistant", "content": "Yes! " * (i % 3 + 1) + "d\x85e"}]}
            for i in range(n)]


def jsonl(path, rows, bom=False, newline="\n", extra=()):
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    for position, line in extra:
        lines.insert(position, line)
    path.write_bytes(((BOM if bom else "") + "".join(line + newline for line in lines)).encode())
    return path


def same_samples(stream, loaded):
    assert list(stream.iter_samples()) == loaded.samples
    assert (stream.count, stream.n_skipped, stream.skipped) == (loaded.count, loaded.n_skipped, loaded.skipped)


@pytest.mark.parametrize("bom,newline", [(False, "\n"), (True, "\r\n"), (False, "\r")])
def test_jsonl_stream_reads_and_copies_like_the_loaded_source(tmp_path, bom, newline):
    path = jsonl(tmp_path / "d.jsonl", records(7), bom, newline, extra=[(2, "{broken"), (5, "   ")])
    warnings = []
    stream = open_samples(path, on_error="skip", warn=warnings.append)
    loaded = load_samples(path, on_error="skip", warn=lambda m: None)
    same_samples(stream, loaded)
    assert len(warnings) == 1 and ":3: not valid JSON" in warnings[0]
    assert (stream.bom, stream.newline) == (bom, newline)
    for indices in ([0, 3, 6], [], list(range(7))):
        stream.write(tmp_path / "a.jsonl", indices)
        loaded.write(tmp_path / "b.jsonl", indices)
        assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    stream.write(tmp_path / "all.jsonl", range(7))
    original = path.read_bytes().decode("utf-8-sig").replace("{broken" + newline, "").replace("   " + newline, "")
    assert (tmp_path / "all.jsonl").read_bytes().decode("utf-8-sig") == original
    assert (tmp_path / "all.jsonl").read_bytes().startswith(BOM.encode()) == bom
    with pytest.raises(DataFileError, match=r"d\.jsonl:3: not valid JSON.*fix the line"):
        open_samples(path)
    assert not list(tmp_path.glob(".*.tmp"))


def test_chunks_and_fetch_hold_only_what_is_asked(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", records(10))
    stream = open_samples(path)
    chunks = list(stream.chunks(4))
    assert [(n, [s.index for s in c]) for n, c in chunks] == [(0, [0, 1, 2, 3]), (1, [4, 5, 6, 7]), (2, [8, 9])]
    assert [n for n, _ in stream.chunks(4, only=lambda n: n % 2 == 1)] == [1]
    loaded = load_samples(path)
    assert [(n, c) for n, c in loaded.chunks(4)] == chunks
    assert stream.fetch([9, 2]) == {2: loaded.samples[2], 9: loaded.samples[9]} == loaded.fetch([2, 9])
    with pytest.raises(ValueError, match="chunk size"):
        list(stream.chunks(0))


def test_csv_stream_with_bom_crlf_malformed_rows_and_quoted_newlines(tmp_path):
    path = tmp_path / "d.csv"
    text = (BOM + "id,prompt,response\r\na,\"Is it, really, good?\",\"Yes,\r\n absolutely.\"\r\nb,only two\r\n"
            ",,\r\nc,Plain,Answer\r\n")
    path.write_bytes(text.encode())
    stream = open_samples(path, on_error="skip", warn=lambda m: None)
    loaded = load_samples(path, on_error="skip", warn=lambda m: None)
    same_samples(stream, loaded)
    assert [s.id for s in stream.iter_samples()] == ["a", "c"] and stream.skipped[0].endswith("d.csv:4: 2 fields, the header has 3")
    stream.write(tmp_path / "a.csv", [0, 1])
    loaded.write(tmp_path / "b.csv", [0, 1])
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() == (BOM + "id,prompt,response\r\na,\"Is it, really, good?\","
                                                 "\"Yes,\r\n absolutely.\"\r\nc,Plain,Answer\r\n").encode()


def test_parquet_file_is_read_in_batches_and_copied_under_its_schema(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from guard.screen import samples as samples_module

    rows = records(9)
    rows[4] = {"id": "bad", "messages": [{"role": "user", "content": "no reply"}]}
    table = pa.Table.from_pylist([{**r, "score": float(i)} for i, r in enumerate(rows)])
    table = table.replace_schema_metadata({b"origin": b"test"})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=4)
    monkeypatch.setattr(samples_module._ParquetStream, "BATCH", 3)  # several batches, across row groups
    stream = open_samples(tmp_path / "d.parquet", on_error="skip", warn=lambda m: None)
    loaded = load_samples(tmp_path / "d.parquet", on_error="skip", warn=lambda m: None)
    same_samples(stream, loaded)
    assert stream.format == "parquet" and stream.count == 8 and "row 4" in stream.skipped[0]
    assert list(stream.sample_rows()) == [0, 1, 2, 3, 5, 6, 7, 8]
    stream.write(tmp_path / "keep.parquet", [0, 3, 4, 7])  # sample 4 is row 5
    loaded.write(tmp_path / "keep2.parquet", [0, 3, 4, 7])
    kept = pq.read_table(tmp_path / "keep.parquet")
    assert kept.schema == table.schema and kept.schema.metadata[b"origin"] == b"test"
    assert kept.to_pylist() == [table.slice(r, 1).to_pylist()[0] for r in (0, 3, 5, 8)]
    assert pq.read_table(tmp_path / "keep2.parquet").equals(kept)
    stream.write(tmp_path / "none.parquet", [])
    assert pq.read_table(tmp_path / "none.parquet").num_rows == 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_saved_dataset_data_files_and_configs(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = records(5)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    stream = open_samples(tmp_path / "ds")
    same_samples(stream, load_samples(tmp_path / "ds"))
    stream.write(tmp_path / "kept", [1, 3])
    assert datasets.load_from_disk(str(tmp_path / "kept"))["id"] == ["s1", "s3"]
    with pytest.raises(DataFileError, match="no configs"):
        open_samples(tmp_path / "ds", config="small")

    # A builder over data files, and a directory whose README names configs (as a hub dataset does).
    jsonl(tmp_path / "a.jsonl", rows[:2])
    jsonl(tmp_path / "b.jsonl", rows[2:])
    files = open_samples("json", data_files=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")])
    assert files.format == "datasets" and [s.id for s in files.iter_samples()] == [r["id"] for r in rows]
    files.write(tmp_path / "from_files", [0, 4])
    assert datasets.load_from_disk(str(tmp_path / "from_files"))["id"] == ["s0", "s4"]
    repo = tmp_path / "repo"
    repo.mkdir()
    jsonl(repo / "small.jsonl", rows[:1])
    jsonl(repo / "big.jsonl", rows)
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: small\n  data_files: small.jsonl\n"
                                    "- config_name: big\n  data_files: big.jsonl\n---\n")
    assert open_samples(repo, config="small").count == 1 and open_samples(repo, config="big").count == 5
    with pytest.raises(DataFileError, match="goes with a hub dataset id"):
        open_samples(tmp_path / "a.jsonl", data_files=["x.jsonl"])
    with pytest.raises(DataFileError, match="could not be loaded"):
        open_samples("json", data_files=[str(tmp_path / "missing-*.jsonl")])


def test_dataset_in_hand_and_field_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"q": ["a?", "b?", ""], "a": ["x", "y", "z"]})
    stream = dataset_stream(ds, fields=FieldNames(prompt="q", response="a"))
    assert [s.response for s in stream.iter_samples()] == ["x", "y", "z"]
    with pytest.raises(DataFileError, match="--prompt-field"):
        dataset_stream(ds)


def test_a_file_that_changes_between_passes_is_an_error(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", records(4))
    stream = open_samples(path)
    jsonl(path, records(5))
    with pytest.raises(DataFileError, match="changed while it was being screened"):
        list(stream.chunks(2))


def test_skip_messages_are_counted_but_capped(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", records(1), extra=[(0, "{bad")] * (MAX_SKIPPED_MESSAGES + 5))
    stream = open_samples(path, on_error="skip", warn=lambda m: None)
    assert stream.n_skipped == MAX_SKIPPED_MESSAGES + 5 and len(stream.skipped) == MAX_SKIPPED_MESSAGES
    assert isinstance(stream, SampleStream) and stream.count == 1


def test_invalid_utf8_names_the_absolute_byte(tmp_path):
    path = tmp_path / "d.jsonl"
    good = (json.dumps(records(1)[0]) + "\n").encode()
    path.write_bytes(good * 3000 + b"\xff\n")  # past the first block the text reader decodes
    with pytest.raises(DataFileError, match=rf"not UTF-8 text \(invalid start byte at byte {len(good) * 3000}\)"):
        open_samples(path)


def test_csv_header_only_and_empty_files(tmp_path):
    (tmp_path / "h.csv").write_text("prompt,response\n")
    with pytest.raises(DataFileError, match="no samples read"):
        open_samples(tmp_path / "h.csv")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataFileError, match="empty CSV"):
        open_samples(tmp_path / "e.csv")
    with open(tmp_path / "ok.csv", "w", newline="") as out:
        csv.writer(out).writerows([["prompt", "response"], ["hi", "ho"]])
    assert open_samples(tmp_path / "ok.csv").newline == "\r\n"
