"""A hostile tester's reproductions: every bad input is a one-line error (naming the problem and
the fix, no traceback) before any model loads where the problem is in the arguments, and nothing
the user owns is ever overwritten."""

import json
import math
import os
import re
import socket
import time

import pytest
import torch
from safetensors.torch import save_file

from helpers import REPO, SMALL, make_tiny_model

from guard.cli.main import main

BOM = "\ufeff"


# -- helpers --------------------------------------------------------------------------------------

def one_line_error(result, *needles):
    """The command failed with exactly one error line, holding every needle, and no traceback."""
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any model is loaded."""
    import guard.core.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the arguments were already known to be wrong")

    monkeypatch.setattr(models, "load_model", refuse)
    for name in ("common", "main", "screen", "monitor", "steer", "harden", "sae", "evaluate"):
        module = __import__(f"guard.cli.{name}", fromlist=["x"])
        if hasattr(module, "load_model_from"):
            monkeypatch.setattr(module, "load_model_from", refuse)


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every attempt to open a network connection."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def write_vector(path, *, model=None, meta_changes=None, tensors=None, header=None):
    """A vector file for the tiny model (or a random one), optionally corrupted."""
    from guard.core.vectors import PersonaVector, metadata_for

    model = model if model is not None else make_tiny_model("llama")
    meta = metadata_for(model, "sycophancy", recommended_layer=1)
    vectors = torch.randn(meta.num_layers, meta.hidden_size, generator=torch.Generator().manual_seed(0))
    PersonaVector(vectors, meta, vectors + 1, torch.ones_like(vectors)).save(path)
    if meta_changes is None and tensors is None and header is None:
        return path
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
        text = f.metadata()["persona_guard"]
    data = json.loads(text)
    for key, value in (meta_changes or {}).items():
        if value is KeyError:
            data.pop(key)
        else:
            data[key] = value
    stored.update(tensors or {})
    save_file(stored, str(path), metadata={"persona_guard": header if header is not None else json.dumps(data)})
    return path


@pytest.fixture
def model_vector(tiny_model_dir, tmp_path):
    """A vector that fits the tiny model directory (random directions, recommended layer 1), made
    without running an extraction."""
    from guard.core.models import load_model

    model, _, _ = load_model(str(tiny_model_dir))
    return write_vector(tmp_path / "fits.safetensors", model=model)


def jsonl(path, records, bom=False, newline="\n"):
    text = "".join(json.dumps(r, ensure_ascii=False) + newline for r in records)
    path.write_bytes(((BOM if bom else "") + text).encode("utf-8"))
    return path


RECORDS = [{"id": f"s{i}", "messages": [{"role": "user", "content": f"Is plan {i} good?"},
                                        {"role": "assistant", "content": "Yes! " * (i + 1)}]} for i in range(6)]


# -- data loss ------------------------------------------------------------------------------------

def test_screen_refuses_outputs_on_its_inputs_and_on_each_other(runner, tmp_path, no_model):
    data = jsonl(tmp_path / "in.jsonl", RECORDS)
    before = data.read_bytes()
    vector = write_vector(tmp_path / "v.safetensors")
    link = tmp_path / "link.jsonl"
    link.symlink_to(data)
    hard = tmp_path / "hard.jsonl"
    os.link(data, hard)
    out = tmp_path / "report"
    base = ["screen", str(data), "--vector", str(vector), "--mode", "approx", "--threshold", "p50", "--out", str(out)]
    cases = [
        (["--keep", str(data)], ["--keep", "overwrite the input"]),
        (["--keep", str(tmp_path / "sub" / ".." / "in.jsonl")], ["--keep", "overwrite the input"]),
        (["--drop", str(link)], ["--drop", "overwrite the input"]),
        (["--keep", str(hard)], ["--keep", "overwrite the input"]),
        (["--keep", str(tmp_path / "a.jsonl"), "--drop", str(tmp_path / "a.jsonl")], ["same file"]),
        (["--keep", str(out / "report.jsonl")], ["report writes", "another name"]),
        (["--drop", str(out / "summary.json")], ["report writes"]),
        (["--keep", str(out / "hist_sycophancy.png")], ["report writes"]),
        (["--keep", str(out / "checkpoint-data.jsonl")], ["report writes"]),
        (["--keep", str(out)], ["report directory"]),
    ]
    for extra, needles in cases:
        one_line_error(runner.invoke(main, [*base, *extra]), *needles)
    # --out on the input file, and a --reference that would be overwritten
    one_line_error(runner.invoke(main, ["screen", str(data), "--vector", str(vector), "--out", str(data)]), "--out")
    ref = jsonl(tmp_path / "ref.jsonl", RECORDS)
    one_line_error(runner.invoke(main, [*base, "--reference", str(ref), "--keep", str(ref)]), "--reference")
    assert data.read_bytes() == before and ref.read_bytes() == before
    assert not out.exists()


def test_a_dataset_copy_never_replaces_a_directory_of_other_files(runner, tmp_path, no_model):
    datasets = pytest.importorskip("datasets")
    from guard.errors import DataFileError
    from guard.screen.samples import load_samples

    datasets.Dataset.from_dict({"prompt": ["a", "b"], "response": ["c", "d"]}).save_to_disk(str(tmp_path / "ds"))
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(DataFileError, match="not a saved dataset"):
        load_samples(tmp_path / "ds").write(precious, [0])
    vector = write_vector(tmp_path / "v.safetensors")
    one_line_error(runner.invoke(main, ["screen", str(tmp_path / "ds"), "--vector", str(vector), "--mode", "approx",
                                        "--threshold", "p50", "--keep", str(precious), "--out", str(tmp_path / "r")]),
                   "not a saved dataset")
    assert [p.name for p in precious.iterdir()] == ["notes.txt"] and (precious / "notes.txt").read_text() == "mine"
    source = load_samples(tmp_path / "ds")
    source.write(tmp_path / "kept", [1])
    source.write(tmp_path / "kept", [0])  # a saved dataset is replaced, atomically
    assert datasets.load_from_disk(str(tmp_path / "kept"))["prompt"] == ["a"]
    assert not list(tmp_path.glob(".kept.*"))


def test_library_screen_refuses_to_overwrite_its_input(tmp_path):
    from guard.errors import ScreenError
    from guard.screen.pipeline import check_output_paths, screen
    from guard.screen.samples import load_samples

    data = jsonl(tmp_path / "in.jsonl", RECORDS)
    source = load_samples(data)
    with pytest.raises(ScreenError, match="overwrite the input"):  # refused before the model is even touched
        screen(source, None, None, [], thresholds={None: "p50"}, keep_path=data)
    with pytest.raises(ScreenError, match="report writes"):
        check_output_paths(data, out_dir=tmp_path / "r", drop_path=tmp_path / "r" / "report.csv")
    with pytest.raises(ScreenError, match="same file"):
        check_output_paths(data, keep_path=tmp_path / "x.jsonl", drop_path=tmp_path / "." / "x.jsonl")
    check_output_paths(data, out_dir=tmp_path / "r", keep_path=tmp_path / "r" / "clean.jsonl")  # fine


def test_bom_jsonl_and_csv_are_read_and_copies_keep_the_encoding(tmp_path):
    from guard.screen.samples import load_samples

    source = load_samples(jsonl(tmp_path / "bom.jsonl", RECORDS[:3], bom=True))
    assert [s.id for s in source.samples] == ["s0", "s1", "s2"] and not source.skipped
    source.write(tmp_path / "keep.jsonl", [0, 2])
    written = (tmp_path / "keep.jsonl").read_bytes()
    assert written.startswith(BOM.encode()) and written.count(BOM.encode()) == 1
    assert written.decode("utf-8-sig").splitlines() == [json.dumps(RECORDS[0]), json.dumps(RECORDS[2])]

    plain = load_samples(jsonl(tmp_path / "plain.jsonl", RECORDS[:2]))
    plain.write(tmp_path / "plain_keep.jsonl", [1])
    assert not (tmp_path / "plain_keep.jsonl").read_bytes().startswith(BOM.encode())

    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes((BOM + "prompt,response\r\nHi?,Hello.\r\n\"Plan, good?\",Yes!\r\n").encode("utf-8"))
    table = load_samples(csv_path)
    assert [s.response for s in table.samples] == ["Hello.", "Yes!"]
    table.write(tmp_path / "keep.csv", [1])
    assert (tmp_path / "keep.csv").read_bytes() == (BOM + "prompt,response\r\n\"Plan, good?\",Yes!\r\n").encode()


def test_verbatim_copies_keep_crlf_and_do_not_split_lines_at_unicode_separators(tmp_path):
    from guard.screen.samples import load_samples

    records = [{"prompt": "a\u2028b", "response": "line\u2029sep"}, {"prompt": "c", "response": "d\x85e"}]
    path = jsonl(tmp_path / "crlf.jsonl", records, newline="\r\n")
    source = load_samples(path)
    assert [s.response for s in source.samples] == ["line\u2029sep", "d\x85e"]
    source.write(tmp_path / "copy.jsonl", [0, 1])
    assert (tmp_path / "copy.jsonl").read_bytes() == path.read_bytes()
    source.write(tmp_path / "second.jsonl", [1])
    assert (tmp_path / "second.jsonl").read_bytes() == (json.dumps(records[1], ensure_ascii=False) + "\r\n").encode()


def test_bom_prompt_files_are_read(tmp_path):
    from guard.core.data import load_ab_items, load_prompts

    (tmp_path / "p.jsonl").write_bytes((BOM + json.dumps({"prompt": "Hello"}) + "\n").encode())
    (tmp_path / "p.txt").write_bytes((BOM + "First\nSecond\n").encode())
    (tmp_path / "p.json").write_bytes((BOM + json.dumps(["Hi"])).encode())
    (tmp_path / "p.csv").write_bytes((BOM + "id,prompt\nx,Hello there\n").encode())
    assert [p.text for p in load_prompts(tmp_path / "p.jsonl")] == ["Hello"]
    assert [p.text for p in load_prompts(tmp_path / "p.txt")] == ["First", "Second"]
    assert [p.text for p in load_prompts(tmp_path / "p.json")] == ["Hi"]
    assert [(p.id, p.text) for p in load_prompts(tmp_path / "p.csv")] == [("x", "Hello there")]
    ab = tmp_path / "ab.json"
    ab.write_bytes((BOM + json.dumps([{"question": "q", "answer_matching_behavior": "(A)",
                                       "answer_not_matching_behavior": "(B)"}])).encode())
    assert load_ab_items(ab)[0].matching == "A"


def test_screen_cli_reads_a_bom_file_and_keeps_its_bom(runner, tiny_model_dir, model_vector, tmp_path):
    data = jsonl(tmp_path / "bom.jsonl", RECORDS, bom=True)
    keep, drop = tmp_path / "keep.jsonl", tmp_path / "drop.jsonl"
    result = runner.invoke(main, ["screen", str(data), "--vector", str(model_vector), "--model", str(tiny_model_dir),
                                  "--mode", "approx", "--threshold", "p50", "--keep", str(keep), "--drop", str(drop),
                                  "--out", str(tmp_path / "r"), "--no-plots", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["samples"] == 6 and summary["malformed_skipped"] == 0
    assert keep.read_bytes().startswith(BOM.encode()) and drop.read_bytes().startswith(BOM.encode())
    lines = sorted(keep.read_text("utf-8-sig").splitlines() + drop.read_text("utf-8-sig").splitlines())
    assert lines == sorted(json.dumps(r) for r in RECORDS)
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written left behind


def test_cached_generate_stores_every_batch_as_it_finishes(tmp_path, monkeypatch):
    import guard.core.generation as generation
    from guard.core.generation import GenerationCache, SamplingConfig, cached_generate

    prompts = [[1] * n for n in range(1, 8)]  # 7 prompts, batches of 2: 4 batches
    calls, updates = [], []

    def fake_generate(model, tokenizer, ids, sampling, *, batch_size=32, **kwargs):
        calls.append((len(ids), sampling.seed))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return [[len(p), 7] for p in ids]

    class Bar:
        def __init__(self, *args, **kwargs):
            pass

        def update(self, n):
            updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(generation, "generate", fake_generate)
    monkeypatch.setattr(generation, "tqdm", Bar)
    sampling = SamplingConfig(max_new_tokens=2, temperature=0.0)
    cache = GenerationCache(tmp_path / "gen.sqlite")
    with pytest.raises(KeyboardInterrupt):
        cached_generate(None, None, prompts, sampling, cache, "m", batch_size=2, progress=True)
    assert updates == [2, 2]  # the bar moves per batch
    keys = [GenerationCache.key("m", sampling, p) for p in prompts]
    assert sorted(cache.get_many(keys).values()) == [[1, 7], [2, 7], [3, 7], [4, 7]]  # the two finished batches
    assert [seed for _, seed in calls] == [0, 1, 2]  # each batch seeded as generate() would seed it
    calls.clear()
    out, generated = cached_generate(None, None, prompts, sampling, cache, "m", batch_size=2)
    assert generated == 3 and [n for n, _ in calls] == [2, 1]  # only what was missing
    assert out == [[len(p), 7] for p in prompts]
    cache.close()


def test_interrupted_full_screen_says_rerun_resumes_and_the_rerun_generates_only_the_rest(
        runner, tiny_model_dir, model_vector, tmp_path, monkeypatch):
    import guard.core.generation as generation

    monkeypatch.setenv("PERSONA_GUARD_CACHE", str(tmp_path / "cache"))
    data = jsonl(tmp_path / "train.jsonl", RECORDS[:5])
    args = ["screen", str(data), "--vector", str(model_vector), "--model", str(tiny_model_dir), "--mode", "full",
            "--max-new-tokens", "3", "--generation-batch-size", "1", "--out", str(tmp_path / "r"), "--no-plots", "--quiet"]
    real, calls = generation.generate, []

    def interrupted_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(generation, "generate", interrupted_on_third)
    result = runner.invoke(main, args)
    assert result.exit_code == 130 and "Traceback" not in result.output
    message = [line for line in result.output.splitlines() if line.strip()][-1]
    assert message.startswith("interrupted") and "rerun the same command to resume" in message
    monkeypatch.setattr(generation, "generate", real)
    again = runner.invoke(main, [*args, "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["base_responses_generated"] == 3  # the two finished batches were kept


def test_interrupted_extraction_does_not_promise_a_resume(runner, tiny_model_dir, tmp_path, monkeypatch):
    import guard.extract.extraction as extraction

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(extraction, "extract_vector", interrupt)
    result = runner.invoke(main, ["extract", "--trait", "sycophancy", "--model", str(tiny_model_dir),
                                  "--out", str(tmp_path / "v.safetensors"), *SMALL])
    assert result.exit_code == 130 and "Traceback" not in result.output
    message = [line for line in result.output.splitlines() if line.strip()][-1]
    assert "does not resume" in message and "starts it over" in message
    assert not (tmp_path / "v.safetensors").exists()


# -- tracebacks -----------------------------------------------------------------------------------

def test_unwritable_outputs_are_refused_before_any_model_loads(runner, tmp_path, no_model):
    data = jsonl(tmp_path / "in.jsonl", RECORDS)
    vector = write_vector(tmp_path / "v.safetensors")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Some text.\n\nMore text.\n")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    screen = ["screen", str(data), "--vector", str(vector), "--mode", "approx", "--threshold", "p50"]
    cases = [
        ([*screen, "--out", str(tmp_path / "r"), "--keep", "/proc/keep.jsonl"], "--keep"),
        ([*screen, "--out", str(tmp_path / "r"), "--drop", "/proc/x/drop.jsonl"], "--drop"),
        ([*screen, "--out", "/proc/sr"], "--out"),
        ([*screen, "--out", str(a_file)], "is a file"),
        ([*screen, "--out", str(tmp_path / "r"), "--keep", str(tmp_path)], "is a directory"),
        (["extract", "--trait", "sycophancy", "--out", "/proc/x.safetensors"], "--out"),
        (["extract", "--trait", "sycophancy", "--out", str(tmp_path / "x.safetensors"), "--responses",
          "/proc/r.jsonl"], "--responses"),
        (["extract", "--trait", "sycophancy", "--out", str(a_file / "v.safetensors")], "is a file, not a directory"),
        (["extract", "--trait", "sycophancy", "--out", str(tmp_path / "x.safetensors"), "--responses",
          str(tmp_path / "x.safetensors")], "same file"),
        (["extract", "--trait", "sycophancy", "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m",
          "--judge-cache", "/proc/j.sqlite", "--out", str(tmp_path / "x.safetensors")], "--judge-cache"),
        (["harden", "--vector", str(vector), "--out", "/proc/hard"], "--out"),
        (["sae", "train", str(corpus), "--layer", "1", "--out", "/proc/sae"], "--out"),
        (["select-layer", str(vector), "--out", "/proc/v.safetensors"], "--out"),
        (["evaluate", "--trait", "sycophancy", "--out", "/proc/e.json"], "--out"),
        (["traits", "new", "x", "--description", "Being x about everything.", "--generator-model", "m",
          "--out", "/proc/x.json"], "--out"),
    ]
    for args, needle in cases:
        one_line_error(runner.invoke(main, args), needle)
    assert not (tmp_path / "r").exists() and not (tmp_path / "x.safetensors").exists()


def test_an_unwritable_base_response_cache_is_refused_before_the_model(runner, tmp_path, no_model, monkeypatch):
    monkeypatch.setenv("PERSONA_GUARD_CACHE", "/proc/persona-guard")
    data = jsonl(tmp_path / "in.jsonl", RECORDS)
    vector = write_vector(tmp_path / "v.safetensors")
    one_line_error(runner.invoke(main, ["screen", str(data), "--vector", str(vector), "--mode", "full", "--out",
                                        str(tmp_path / "r")]), "base-response cache", "$PERSONA_GUARD_CACHE", "--mode approx")


@pytest.mark.parametrize("problem, change, needle", [
    ("corrupt json", {"header": "{not json"}, "not valid JSON"),
    ("missing fields", {"meta_changes": {"trait": KeyError, "num_layers": KeyError}}, "lacks trait, num_layers"),
    ("wrong type", {"meta_changes": {"hidden_size": "32"}}, "'hidden_size' should be an integer"),
    ("bool layer count", {"meta_changes": {"num_layers": True}}, "'num_layers' should be an integer"),
    ("wrong container", {"meta_changes": {"layer_stats": [1, 2]}}, "'layer_stats' should be an object"),
    ("bad effect sizes", {"meta_changes": {"layer_stats": {"effect_size": ["a", "b", "c"]}}}, "effect_size"),
    ("layer out of range", {"meta_changes": {"recommended_layer": 999}}, "recommended_layer 999 is out of range"),
    ("negative layer", {"meta_changes": {"recommended_layer": -1}}, "out of range"),
    ("not an object", {"header": "[1, 2]"}, "not a persona-guard vector file"),
    ("nan vector", {"tensors": {"vectors": torch.full((3, 32), math.nan)}}, "NaN or infinite"),
    ("inf mean", {"tensors": {"pos_mean": torch.full((3, 32), math.inf)}}, "'pos_mean' tensor holds NaN or infinite"),
    ("wrong mean shape", {"tensors": {"neg_mean": torch.zeros(2, 32)}}, "'neg_mean' tensor has shape"),
])
def test_bad_vector_headers_and_tensors_are_one_clear_error(tmp_path, runner, problem, change, needle):
    from guard.core.vectors import PersonaVector, VectorFileError

    path = write_vector(tmp_path / "bad.safetensors", **change)
    with pytest.raises(VectorFileError, match=re.escape(needle)) as raised:
        PersonaVector.load(path)
    assert "\n" not in str(raised.value) and str(path) in str(raised.value)
    one_line_error(runner.invoke(main, ["inspect", str(path)]), needle)
    one_line_error(runner.invoke(main, ["inspect", str(path), "--json"]), needle)


def test_a_nan_layer_is_named(tmp_path):
    from guard.core.vectors import PersonaVector, VectorFileError

    vectors = torch.ones(3, 32)
    vectors[2, 5] = math.nan
    path = write_vector(tmp_path / "nan.safetensors", tensors={"vectors": vectors})
    with pytest.raises(VectorFileError, match=r"at layer\(s\) 2,"):
        PersonaVector.load(path)


def test_screen_with_an_out_of_range_recommended_layer_is_no_index_error(runner, tmp_path, no_model):
    data = jsonl(tmp_path / "in.jsonl", RECORDS)
    vector = write_vector(tmp_path / "v.safetensors", meta_changes={"recommended_layer": 999})
    one_line_error(runner.invoke(main, ["screen", str(data), "--vector", str(vector), "--out", str(tmp_path / "r")]),
                   "recommended_layer 999 is out of range")


def test_monitor_with_an_empty_reference_is_a_clean_error(runner, tmp_path, no_model):
    vector = write_vector(tmp_path / "v.safetensors")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one_line_error(runner.invoke(main, ["monitor", "--vector", str(vector), "--prompt", "Hi", "--reference",
                                        str(empty)]), "--reference", "0 prompt(s)", "at least two")


# -- slow or misleading messages ------------------------------------------------------------------

def test_a_mistyped_data_path_is_file_not_found_at_once(runner, tmp_path, no_model, no_network, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    jsonl(tmp_path / "in" / "train.jsonl", RECORDS)
    vector = write_vector(tmp_path / "v.safetensors")
    started = time.perf_counter()
    error = one_line_error(runner.invoke(main, ["screen", "in/trian.jsonl", "--vector", str(vector)]),
                           "file not found: in/trian.jsonl")
    assert "did you mean in/train.jsonl" in error
    one_line_error(runner.invoke(main, ["screen", "./missing", "--vector", str(vector)]), "file not found")
    one_line_error(runner.invoke(main, ["screen", "data/x/y", "--vector", str(vector)]), "file not found")
    one_line_error(runner.invoke(main, ["screen", str(vector), "--vector", str(vector), "--mode", "approx"]),
                   "unknown format")
    assert time.perf_counter() - started < 10 and not no_network


def test_an_uncached_dataset_id_is_one_line_and_tries_no_network(tmp_path, no_network, monkeypatch):
    pytest.importorskip("datasets")
    import huggingface_hub.constants as hub_constants

    from guard.errors import DataFileError
    from guard.screen.samples import load_samples

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    offline_before = hub_constants.HF_HUB_OFFLINE
    with pytest.raises(DataFileError, match="not in the local datasets cache") as raised:
        load_samples("no-such-user/no-such-dataset-xyz")
    assert "\n" not in str(raised.value) and "nothing is downloaded" in str(raised.value)
    assert not no_network
    # The offline switches were only for that call.
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ
    assert hub_constants.HF_HUB_OFFLINE == offline_before


def test_thresholds_and_layers_are_checked_against_the_vectors_before_the_model(runner, tmp_path, no_model):
    data = jsonl(tmp_path / "in.jsonl", RECORDS)
    vector = write_vector(tmp_path / "v.safetensors")
    base = ["screen", str(data), "--vector", str(vector), "--mode", "approx", "--out", str(tmp_path / "r")]
    for spec, needle in (("nan", "not a finite number"), ("inf", "not a finite number"), ("-inf", "finite"),
                         ("sycophancy=nan", "for sycophancy"), ("pnan", "neither a number nor a percentile"),
                         ("p101", "percentile"), ("evil=p90", "not screened")):
        one_line_error(runner.invoke(main, [*base, "--threshold", spec]), needle)
    one_line_error(runner.invoke(main, [*base, "--threshold", "p90", "--threshold", "p95"]), "two thresholds")
    one_line_error(runner.invoke(main, [*base, "--layer", "7"]), "layer 7 is out of range")
    one_line_error(runner.invoke(main, [*base, "--layer", "x"]), "cannot read 'x'")
    one_line_error(runner.invoke(main, ["monitor", "--vector", str(vector), "--prompt", "x", "--threshold", "nan"]),
                   "not a finite number")
    one_line_error(runner.invoke(main, ["monitor", "--vector", str(vector), "--prompt", "x", "--layer", "5"]),
                   "layer 5 is out of range")
    one_line_error(runner.invoke(main, ["generate", "--vector", str(vector), "--prompt", "x", "--coeff", "nan"]),
                   "not a finite number")
    one_line_error(runner.invoke(main, ["sweep", str(vector), "--coeffs", "1,nan"]), "cannot read 'nan'")
    one_line_error(runner.invoke(main, ["sweep", str(vector), "--layer", "3"]), "layer 3 is out of range")
    one_line_error(runner.invoke(main, ["harden", "--vector", str(vector), "--layer", "-4",
                                        "--out", str(tmp_path / "h")]), "layer -4 is out of range")
    one_line_error(runner.invoke(main, ["sae", "explain", "--sae", str(tmp_path), "--vector", str(vector),
                                        "--text", str(data), "--layer", "9"]), "layer 9 is out of range")
    assert not (tmp_path / "r").exists()


def test_library_refuses_a_nan_threshold():
    from guard.errors import ScreenError
    from guard.screen.pipeline import check_threshold_specs, parse_threshold_specs

    assert parse_threshold_specs(["p95", "evil=2.5"]) == {None: "p95", "evil": "2.5"}
    with pytest.raises(ScreenError, match="not a finite number"):
        parse_threshold_specs(["nan"])
    with pytest.raises(ScreenError, match="not a finite number"):
        check_threshold_specs({None: "inf"})


def test_messages_only_suggest_options_the_command_has(runner, tiny_model_dir, tmp_path):
    pytest.importorskip("sae_lens")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "fine"}) + "\n{broken\n")
    error = one_line_error(runner.invoke(main, ["sae", "train", str(corpus), "--layer", "1", "--out",
                                                str(tmp_path / "sae"), "--model", str(tiny_model_dir)]),
                           "corpus.jsonl:2: not valid JSON")
    assert "--on-error" not in error


def test_monitor_messages_fit_its_options(runner, tmp_path, no_model):
    vector = write_vector(tmp_path / "v.safetensors")
    bad_ref = tmp_path / "ref.jsonl"
    bad_ref.write_text(json.dumps({"prompt": "a"}) + "\n{broken\n")
    error = one_line_error(runner.invoke(main, ["monitor", "--vector", str(vector), "--prompt", "x", "--reference",
                                                str(bad_ref)]), "ref.jsonl:2: not valid JSON")
    assert "--on-error" not in error
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("\n\n")
    error = one_line_error(runner.invoke(main, ["monitor", "--vector", str(vector), "--prompts", str(empty)]),
                           "holds no prompts")
    assert "give prompts with --prompts" not in error
    one_line_error(runner.invoke(main, ["generate", "--prompts", str(empty)]), "holds no prompts")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{broken\n")
    one_line_error(runner.invoke(main, ["monitor", "--vector", str(vector), "--prompts", str(bad)]),
                   "--on-error skip")  # where it does apply, it is suggested


def test_csv_prompt_files_are_read_by_header_or_refused(tmp_path, runner, no_model):
    from guard.core.data import DataFileError, load_prompts

    good = tmp_path / "p.csv"
    good.write_text('id,question,system\n1,"Is it, really?",Be brief.\n2,Second,\n')
    prompts = load_prompts(good)
    assert [(p.id, p.text) for p in prompts] == [("1", "Is it, really?"), ("2", "Second")]
    assert prompts[0].messages[0] == {"role": "system", "content": "Be brief."} and len(prompts[1].messages) == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DataFileError, match="prompt/question/text column"):
        load_prompts(bad)
    vector = write_vector(tmp_path / "v.safetensors")
    one_line_error(runner.invoke(main, ["monitor", "--vector", str(vector), "--prompts", str(bad)]),
                   "prompt/question/text column")


def test_non_string_message_content_is_named(tmp_path):
    from guard.core.data import DataFileError, as_prompts
    from guard.screen.samples import load_samples

    path = jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                      {"role": "assistant", "content": 42}]}])
    with pytest.raises(DataFileError, match=r"d\.jsonl:1: message 2 of 'messages' has content 42 \(int\)"):
        load_samples(path)
    path = jsonl(tmp_path / "e.jsonl", [{"prompt": [{"role": "user", "content": ["a", "list"]}], "response": "x"}])
    with pytest.raises(DataFileError, match=r"message 1 of 'prompt' has content \[\"a\", \"list\"\] \(list\)"):
        load_samples(path)
    with pytest.raises(DataFileError, match=r"message 1 of 'messages' has content null"):
        as_prompts([[{"role": "user", "content": None}]])
    with pytest.raises(DataFileError, match=r"'prompt' is 7 \(int\)"):
        as_prompts([{"prompt": 7}])


def test_validating_a_non_json_trait_file_says_so(runner, tmp_path, no_model):
    some = tmp_path / "some.jsonl"
    some.write_text('{"name": "x"}\n')
    result = runner.invoke(main, ["traits", "validate", str(some)])
    assert result.exit_code == 1 and "unknown trait" not in result.output
    assert "not a trait file" in result.output and ".json" in result.output
    one_line_error(runner.invoke(main, ["extract", "--trait", str(some)]), "not a trait file")


def test_a_vector_of_an_unshipped_trait_suggests_trait(runner, tmp_path, no_model):
    vector = write_vector(tmp_path / "v.safetensors", meta_changes={"trait": "overconfidence"})
    for args in (["harden", "--vector", str(vector), "--out", str(tmp_path / "h")], ["sweep", str(vector)],
                 ["select-layer", str(vector)]):
        one_line_error(runner.invoke(main, args), "'overconfidence' is not shipped",
                       "--trait path/to/overconfidence.json")


def test_a_vector_from_another_model_names_both_models_distinctly():
    from guard.core.vectors import ModelIdentity, VectorMismatchError

    model = make_tiny_model("llama")
    identity = ModelIdentity.of(model)
    other = ModelIdentity(identity.model_name, identity.model_fingerprint, identity.model_type,
                          identity.hidden_size * 2, identity.num_layers)
    with pytest.raises(VectorMismatchError) as raised:
        other.check(model, "the 'x' vector")
    message = str(raised.value)
    assert "hidden size: vector 64, model 32" in message
    name = re.escape(identity.model_name)
    assert not re.search(rf"from {name},? (which does not match|and does not fit) {name}\b(?! \()", message)
    assert "a model of that name with other weights or shape" in message


# -- help and terminal output ---------------------------------------------------------------------

def _commands(group=None, prefix=()):
    import click

    group = group or main
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def _model_option_names():
    from guard.cli.common import model_options

    return {p.name for p in model_options(lambda **kw: None).__click_params__}


def test_every_option_has_help_and_every_model_command_has_quiet():
    owned_elsewhere = _model_option_names()  # --model/--dtype/--device/...: one shared decorator
    missing, no_quiet = [], []
    for path, command in _commands():
        names = {p.name for p in command.params}
        for param in command.params:
            if param.param_type_name == "option" and not param.help and param.name not in owned_elsewhere:
                missing.append(f"{' '.join(path)} {param.opts[0]}")
        if "model_id" in names and "quiet" not in names:
            no_quiet.append(" ".join(path))
    assert not missing, missing
    assert not no_quiet, no_quiet


def test_top_level_help_shows_screen_and_harden(runner):
    text = runner.invoke(main, ["--help"]).output
    assert "persona-guard screen " in text and "persona-guard harden " in text


def _check_80_columns(output, headers, folded=()):
    """No line over 80 characters; each header whole on one line; each of ``folded`` (ids,
    paths) complete, though perhaps folded over several lines (of a table cell)."""
    lines = output.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    for header in headers:
        assert any(header in line for line in lines), (header, output)
    plain = "".join(line.strip() for line in lines)  # text folded over plain lines
    first_column = "".join(line.split("│")[1].strip() for line in lines if line.count("│") >= 2)  # a table's
    for text in folded:
        assert text in plain or text in first_column, (text, output)


def test_tables_fit_80_columns_with_whole_headers_and_ids(runner, tiny_model_dir, model_vector, tmp_path, monkeypatch):
    from guard.cli.common import console

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(console, "_width", 80)  # the module console read COLUMNS at import
    others = []
    for trait in ("evil", "hallucination"):
        path = tmp_path / f"{trait}-with-a-rather-long-file-name.safetensors"
        write_vector(path, meta_changes={"trait": trait})
        others.append(path)
    inspected = runner.invoke(main, ["inspect", str(model_vector), *map(str, others)])
    assert inspected.exit_code == 0, inspected.output
    _check_80_columns(inspected.stdout, ["Cosine similarity per layer", "1 vs 2", "1 vs 3", "2 vs 3", "effect size d"],
                      [str(others[1])])
    listed = runner.invoke(main, ["traits", "list"])
    _check_80_columns(listed.stdout, ["extraction questions", "evaluation questions", "myopic-reward"])
    long_id = "sample-0123456789-abcdefghij-long-identifier"
    records = [{**r, "id": f"{long_id}-{i}"} for i, r in enumerate(RECORDS)]
    data = jsonl(tmp_path / "d.jsonl", records)
    screened = runner.invoke(main, ["screen", str(data), "--vector", str(model_vector), "--model", str(tiny_model_dir),
                                    "--mode", "approx", "--out", str(tmp_path / "r"), "--no-plots", "--quiet"])
    assert screened.exit_code == 0, screened.output
    _check_80_columns(screened.stdout, ["trait", "threshold", "mean projection", "approx ΔP", "response"],
                      [f"{long_id}-{i}" for i in range(5)])  # the top five
    prompts = tmp_path / "p.jsonl"
    jsonl(prompts, [{"id": f"{long_id}-{i}", "prompt": "Please agree with me about everything " * 3} for i in range(2)])
    monitored = runner.invoke(main, ["monitor", "--vector", str(model_vector), "--model", str(tiny_model_dir),
                                     "--prompts", str(prompts), "--quiet"])
    assert monitored.exit_code == 0, monitored.output
    _check_80_columns(monitored.stdout, ["prompt", "sycophancy z (L1)"], [f"{long_id}-0", f"{long_id}-1"])


def test_readme_is_consistent_with_the_cli():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert ".venv/bin/persona-guard" in readme and "source .venv/bin/activate" in readme
    table = readme[readme.index("## What it does today"):readme.index("### Layer convention")]
    rows = [line for line in table.splitlines()[1:] if line.strip()]
    body = table[table.index("| |"):].rstrip()
    assert "\n\n" not in body  # a blank line would cut the table in two
    for row in rows:
        unescaped = re.sub(r"\\\|", "", row)
        assert unescaped.count("|") == 3, row  # two cells: `|` inside a cell must be escaped
    from click.testing import CliRunner

    extract_help = CliRunner().invoke(main, ["extract", "--help"]).output
    seconds = re.search(r"(\d+)-(\d+) s for sycophancy", " ".join(extract_help.split()))
    assert seconds and f"{seconds[1]}–{seconds[2]} s" in readme
    assert "about 40 s" not in extract_help
