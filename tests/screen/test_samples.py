"""Reading training samples (JSONL, CSV, datasets; multi-turn; malformed records) and writing
filtered copies in the input's own format."""

import csv
import json

import pytest

from guard.core.data import DataFileError
from guard.screen.samples import FieldNames, load_samples

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Is my plan good?"},
                {"role": "assistant", "content": "It is perfect!"}]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_jsonl_messages_multi_turn_and_prompt_response_forms(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        json.dumps({"id": "conv", "messages": CONVERSATION}),
        json.dumps({"prompt": "Tell me a fact.", "completion": "Water is wet.", "system": "Be terse."}),
        json.dumps({"prompt": [{"role": "user", "content": "2+2?"}],
                    "completion": [{"role": "assistant", "content": "4"}]}),
        json.dumps({"question": "Capital of France?", "answer": "Paris."}),
    ])
    source = load_samples(path)
    first, second, third, fourth = source.samples
    assert first.id == "conv" and first.response == "It is perfect!"
    assert list(first.prompt) == CONVERSATION[:-1] and first.last_user == "Is my plan good?"
    assert second.id == "1" and second.prompt == ({"role": "system", "content": "Be terse."},
                                                  {"role": "user", "content": "Tell me a fact."})
    assert third.prompt == ({"role": "user", "content": "2+2?"},) and third.response == "4"
    assert fourth.response == "Paris." and fourth.where.endswith("d.jsonl:4")


def test_configurable_field_names(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"q": "Why?", "a": "Because.", "key": 7})])
    with pytest.raises(DataFileError, match="--prompt-field"):
        load_samples(path)
    sample = load_samples(path, fields=FieldNames(prompt="q", response="a", id="key")).samples[0]
    assert (sample.id, sample.last_user, sample.response) == ("7", "Why?", "Because.")


def test_malformed_lines_fail_with_their_line_number_or_are_skipped(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "a", "response": "b"}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "no reply"}]}),
        json.dumps({"prompt": "c", "response": "d"}),
    ])
    with pytest.raises(DataFileError, match=r"d\.jsonl:2: not valid JSON"):
        load_samples(path)
    warnings = []
    source = load_samples(path, on_error="skip", warn=warnings.append)
    assert [s.response for s in source.samples] == ["b", "d"]
    assert [s.index for s in source.samples] == [0, 1]
    assert len(warnings) == 2 and ":2:" in warnings[0] and ":3:" in warnings[1] and "assistant" in warnings[1]


def test_jsonl_filtered_copy_is_the_input_minus_dropped_lines_verbatim(tmp_path):
    lines = [json.dumps({"id": f"s{i}", "prompt": f"p{i}", "response": f"r {i}"}, indent=None, separators=(", ", ": "))
             for i in range(5)]
    source = load_samples(write_lines(tmp_path / "d.jsonl", lines))
    source.write(tmp_path / "keep.jsonl", [0, 2, 4])
    source.write(tmp_path / "drop.jsonl", [3, 1])
    assert (tmp_path / "keep.jsonl").read_text().splitlines() == [lines[0], lines[2], lines[4]]
    assert (tmp_path / "drop.jsonl").read_text().splitlines() == [lines[1], lines[3]]


def test_csv_reading_malformed_rows_and_filtered_copy(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["id", "prompt", "response"])
        writer.writerow(["a", "Is it, really, good?", "Yes,\n absolutely."])
        writer.writerow(["b", "only two fields"])
        writer.writerow(["c", "Plain", "Answer"])
        writer.writerow(["d", "Conversation", json.dumps(CONVERSATION[-1:])])
    with pytest.raises(DataFileError, match=r"d\.csv:4: 2 fields"):
        load_samples(path)
    source = load_samples(path, on_error="skip")
    assert [s.id for s in source.samples] == ["a", "c", "d"]
    assert source.samples[0].response == "Yes,\n absolutely."
    source.write(tmp_path / "keep.csv", [0, 2])
    with open(tmp_path / "keep.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows == [["id", "prompt", "response"], ["a", "Is it, really, good?", "Yes,\n absolutely."],
                    ["d", "Conversation", json.dumps(CONVERSATION[-1:])]]


def test_csv_messages_column_holding_json(tmp_path):
    path = tmp_path / "m.csv"
    with open(path, "w", newline="", encoding="utf-8") as out:
        csv.writer(out).writerows([["messages"], [json.dumps(CONVERSATION)]])
    sample = load_samples(path).samples[0]
    assert sample.response == "It is perfect!" and len(sample.prompt) == 4


def test_saved_datasets_directory_and_filtered_copy(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"id": ["x", "y", "z"], "messages": [CONVERSATION, CONVERSATION[1:3], CONVERSATION[:2]]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataFileError, match="row 2"):
        load_samples(tmp_path / "ds")
    source = load_samples(tmp_path / "ds", on_error="skip")
    assert source.format == "datasets" and [s.id for s in source.samples] == ["x", "y"]
    assert source.samples[1].response == "Hello."
    source.write(tmp_path / "kept", [1])
    kept = datasets.load_from_disk(str(tmp_path / "kept"))
    assert kept["id"] == ["y"] and kept.column_names == ["id", "messages"]


def test_unknown_sources_are_clear_errors(tmp_path):
    (tmp_path / "d.tsv").write_text("x")
    with pytest.raises(DataFileError, match="unknown format"):
        load_samples(tmp_path / "d.tsv")
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(DataFileError, match="not a readable parquet file"):
        load_samples(tmp_path / "d.parquet")
    with pytest.raises(DataFileError, match="not in the local datasets cache"):
        load_samples("no-such-user/no-such-dataset-xyz")
    empty = write_lines(tmp_path / "e.jsonl", ["{bad"])
    with pytest.raises(DataFileError, match="no samples read"):
        load_samples(empty, on_error="skip")
