"""``accelerate launch`` with two CPU processes (gloo): a Trainer with both callbacks attached logs
one set of readings, identical on both ranks, and writes one report."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import accelerate_worker as worker

pytest.importorskip("accelerate")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_processes(tmp_path, embedded_dir):
    launcher = Path(sys.executable).with_name("accelerate")
    # --multi_gpu is accelerate's multi-process launcher (torch.distributed.run underneath); with
    # use_cpu=True the Trainer runs it as MULTI_CPU over gloo. (`--cpu` with 2 processes needs MPI.)
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(_free_port()), str(Path(worker.__file__)), str(tmp_path), str(embedded_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}  # no user accelerate config
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                           start_new_session=True)
    try:
        _, stderr = run.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)  # the launcher and both workers
        run.communicate()
        raise
    assert run.returncode == 0, stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert {r["distributed_type"] for r in ranks} == {"DistributedType.MULTI_CPU"}
    assert [r["hooks"] for r in ranks] == [0, 0]
    assert ranks[0]["steered_forwards"] == ranks[1]["steered_forwards"] == 5
    # Identical values on both ranks (each probed a different shard; the means are reduced).
    assert ranks[0]["history"] == ranks[1]["history"]
    assert [h["step"] for h in ranks[0]["history"]] == [0, 2, 3, 4, 5]
    assert any(abs(h["persona/sycophancy/shift"]) > 0 for h in ranks[0]["history"])
    assert ranks[0]["log_history"] == ranks[1]["log_history"]
    logged = ranks[0]["log_history"]
    assert [e["step"] for e in logged if "persona/sycophancy/shift" in e] == [2, 4, 5]
    assert [e["step"] for e in logged if "eval_persona/sycophancy/shift" in e] == [3, 5]
    # One report, one set of TensorBoard logs: the main process only.
    assert [r["reports"] for r in ranks] == [1, 0]
    report = json.loads((tmp_path / "persona_drift.json").read_text())
    assert report["history"] == ranks[0]["history"]
    assert len(list(tmp_path.rglob("events.out.tfevents*"))) == 1
