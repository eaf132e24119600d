"""``screen`` sharded across two CPU processes (gloo on 127.0.0.1): under torchrun the report is the
single-process report byte for byte; a sharded run killed midway resumes, under accelerate launch,
to the same report. Every launch is bounded and its whole process group killed on timeout."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("screen_worker.py")
LIMIT = 300  # seconds per launch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path, **extra):
    # One thread per process in every run, sharded or not, so the float arithmetic is the same.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"),
            "PERSONA_GUARD_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false", **extra}


def _descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (torchrun starts each worker in its own session, so
    killing the launcher's process group would leave the workers running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill(run: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process it started, each by its id."""
    for pid in [*_descendants(run.pid), run.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    run.communicate()


def _run(command, env, timeout=LIMIT):
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                           start_new_session=True)
    try:
        stdout, stderr = run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(run)
        raise
    assert run.returncode == 0, stderr[-3000:]
    return stdout, stderr


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--local-addr", "127.0.0.1", *args]


@pytest.fixture
def setup(tmp_path, tiny_dir):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"id": f"s{i}", "messages": [
        {"role": "user", "content": f"Is plan {i} good?" + " Please tell me." * (i % 4)},
        {"role": "assistant", "content": "Yes, brilliant! " * (i % 5 + 1)}]}) + "\n" for i in range(40)))
    return tmp_path, data


def _args(tmp_path, data, out):
    return ["screen", str(data), "--vector", str(tmp_path / "v.safetensors"), "--model", str(tmp_path / "tiny"),
            "--mode", "approx", "--chunk-size", "5", "--token-budget", "96", "--threshold", "p80",
            "--keep", str(tmp_path / f"{out}.keep.jsonl"), "--out", str(tmp_path / out), "--no-plots",
            "--explain-top", "3", "--json"]


def _outputs(tmp_path, out):
    return {name: (tmp_path / out / name).read_bytes() for name in ("report.jsonl", "report.csv")} | \
        {"keep": (tmp_path / f"{out}.keep.jsonl").read_bytes()}


def test_two_processes_write_the_single_process_report(setup):
    tmp_path, data = setup
    single, _ = _run([sys.executable, "-m", "guard.cli.main", *_args(tmp_path, data, "single")], _env(tmp_path))
    sharded, stderr = _run(_torchrun("-m", "guard.cli.main", *_args(tmp_path, data, "sharded")), _env(tmp_path))
    assert _outputs(tmp_path, "sharded") == _outputs(tmp_path, "single")
    one, two = json.loads(single), json.loads(sharded)  # only rank 0 prints its summary
    assert {k: v for k, v in two.items() if k not in ("written", "report")} == \
        {k: v for k, v in one.items() if k not in ("written", "report")}
    assert two["samples"] == 40 and two["dropped"] == 8
    assert (tmp_path / "sharded" / "report.html").exists() and not (tmp_path / "sharded" / ".screen-parts").exists()
    assert len(list((tmp_path / "sharded").glob("checkpoint-data-*.jsonl"))) == 8


def test_a_sharded_run_killed_midway_resumes_to_the_same_report(setup):
    tmp_path, data = setup
    _run([sys.executable, "-m", "guard.cli.main", *_args(tmp_path, data, "single")], _env(tmp_path))
    out = tmp_path / "sharded"
    run = subprocess.Popen(_torchrun(str(WORKER), *_args(tmp_path, data, "sharded")), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=_env(tmp_path, SCREEN_WORKER_DELAY="0.4"), start_new_session=True)
    done_batches = 0
    try:
        deadline = time.monotonic() + LIMIT
        while time.monotonic() < deadline and run.poll() is None:
            done_batches = sum(len(p.read_text().splitlines()) - 1 for p in out.glob("checkpoint-data-*.jsonl"))
            if done_batches >= 6:
                break
            time.sleep(0.1)
    finally:
        _kill(run)  # mid-run: both workers and the launcher at once
    assert done_batches >= 6 and not (out / "report.jsonl").exists()
    launcher = Path(sys.executable).with_name("accelerate")
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(_free_port()), str(Path(sys.executable).with_name("persona-guard")),
               *_args(tmp_path, data, "sharded")]
    _, stderr = _run(command, _env(tmp_path))
    assert "resuming from" in stderr
    assert _outputs(tmp_path, "sharded") == _outputs(tmp_path, "single")
