"""``screen`` on the sources and options that came with chunked screening: parquet files and their
copies, datasets builders over --data-files, --chunk-size (a rerun is the same report), and the help."""

import json

import pytest
import torch

from guard.cli.main import main


@pytest.fixture
def vector(tiny_model_dir, tmp_path):
    from guard.core.models import load_model
    from guard.core.vectors import PersonaVector, metadata_for

    model, _, _ = load_model(str(tiny_model_dir))
    meta = metadata_for(model, "sycophancy", recommended_layer=1)
    PersonaVector(torch.randn(meta.num_layers, meta.hidden_size, generator=torch.Generator().manual_seed(0)),
                  meta).save(tmp_path / "v.safetensors")
    return tmp_path / "v.safetensors"


ROWS = [{"id": f"s{i}", "prompt": f"Is plan {i} good?", "response": "Yes! " * (i % 4 + 1), "weight": i / 2}
        for i in range(11)]


def test_parquet_in_parquet_out_and_chunked_reruns(runner, tiny_model_dir, vector, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, tmp_path / "train.parquet")
    args = ["screen", str(tmp_path / "train.parquet"), "--vector", str(vector), "--model", str(tiny_model_dir),
            "--mode", "approx", "--chunk-size", "3", "--threshold", "p70", "--keep", str(tmp_path / "keep.parquet"),
            "--drop", str(tmp_path / "drop.parquet"), "--out", str(tmp_path / "r"), "--no-plots", "--json"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["format"] == "parquet" and summary["samples"] == 11 and summary["dropped"] == 3
    kept, dropped = pq.read_table(tmp_path / "keep.parquet"), pq.read_table(tmp_path / "drop.parquet")
    assert kept.schema == table.schema and kept.num_rows == 8 and dropped.num_rows == 3
    report = [json.loads(line) for line in (tmp_path / "r" / "report.jsonl").read_text().splitlines()]
    assert sorted(dropped.column("id").to_pylist()) == sorted(r["id"] for r in report if r["dropped"])
    assert kept.to_pylist() == [r for r in ROWS if r["id"] not in set(dropped.column("id").to_pylist())]
    assert len(list((tmp_path / "r").glob("checkpoint-data-*.jsonl"))) == 4
    first = (tmp_path / "r" / "report.jsonl").read_bytes()
    again = runner.invoke(main, args)
    assert again.exit_code == 0 and (tmp_path / "r" / "report.jsonl").read_bytes() == first
    restarted = runner.invoke(main, [*args, "--restart"])
    assert restarted.exit_code == 0 and (tmp_path / "r" / "report.jsonl").read_bytes() == first
    human = runner.invoke(main, [a for a in args if a != "--json"])
    assert human.exit_code == 0 and "highest sycophancy scores" in human.output and "dropped 3, kept 8" in human.output


def test_a_builder_over_data_files(runner, tiny_model_dir, vector, tmp_path):
    datasets = pytest.importorskip("datasets")
    for name, rows in (("a.jsonl", ROWS[:5]), ("b.jsonl", ROWS[5:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(main, ["screen", "json", "--data-files", str(tmp_path / "a.jsonl"), "--data-files",
                                  str(tmp_path / "b.jsonl"), "--vector", str(vector), "--model", str(tiny_model_dir),
                                  "--mode", "approx", "--threshold", "p50", "--keep", str(tmp_path / "kept"),
                                  "--out", str(tmp_path / "r"), "--no-plots", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["format"] == "datasets"
    assert datasets.load_from_disk(str(tmp_path / "kept")).num_rows == json.loads(result.stdout)["kept"]
    missing = runner.invoke(main, ["screen", "json", "--data-files", str(tmp_path / "nope-*.jsonl"), "--vector",
                                   str(vector), "--mode", "approx", "--out", str(tmp_path / "r2")])
    assert missing.exit_code == 1 and "could not be loaded" in missing.output and "Traceback" not in missing.output


def test_help_tells_how_to_scale(runner):
    text = runner.invoke(main, ["screen", "--help"]).output
    for needle in ("--chunk-size", "torchrun", "accelerate launch", "--base-url", "--base-model", ".parquet",
                   "--data-files", "--config"):
        assert needle in text, needle
