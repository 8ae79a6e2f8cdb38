"""Distributed faults: a 2-process gloo job on 127.0.0.1 where rank 1 dies (SIGKILL) or hangs (SIGSTOP).

Rank 0 must leave with exit code 1 and one line naming its rank within the process-group timeout, never hang.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_main_cli import TINY  # noqa: E402  (the tiny model and demo data of the CLI tests)

DIST_TIMEOUT = 20  # --dist_timeout, seconds; shorter ones can expire at start-up on a loaded machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tails(logs: list[Path]) -> str:
    return "\n".join(f"--- rank {rank}:\n{log.read_text()[-2000:]}" for rank, log in enumerate(logs))


def _wait_for(path: Path, text: str, proc: subprocess.Popen, logs: list[Path], timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return
        assert proc.poll() is None, f"exited with {proc.returncode} before {text!r}:\n{_tails(logs)}"
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} in {path} after {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_dead_or_hung_rank_makes_rank_0_exit_with_an_error_in_bounded_time(tmp_path, fault):
    from datasets import generate_demo_dataset

    data = generate_demo_dataset(tmp_path / "data", 12, 6, 64)
    port = _free_port()
    command = [sys.executable, str(ROOT / "main.py"), *TINY, "--coco_path", str(data), "--output_dir",
               str(tmp_path / "out"), "--epochs", "1000", "--eval_every", "1000", "--device", "cpu",
               "--dist_timeout", str(DIST_TIMEOUT)]
    procs, logs = [], []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        logs.append(tmp_path / f"rank{rank}.txt")
        with open(logs[-1], "w") as f:
            procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
    try:
        _wait_for(logs[0], "training 1000 epochs", procs[0], logs)
        time.sleep(1.0)  # a few steps into training
        assert procs[0].poll() is None and procs[1].poll() is None, f"a rank stopped early:\n{_tails(logs)}"
        procs[1].send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        start = time.time()
        try:
            procs[0].wait(timeout=DIST_TIMEOUT + 45)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"rank 0 still running {DIST_TIMEOUT + 45} s after rank 1 {fault}") from None
        elapsed = time.time() - start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
    output = logs[0].read_text()
    assert procs[0].returncode == 1, _tails(logs)
    assert "Traceback" not in output, _tails(logs)
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: rank 0: a distributed operation failed, another process probably died or timed "
                           f"out (--dist_timeout {DIST_TIMEOUT} s): "), last
    assert elapsed < DIST_TIMEOUT + 30, elapsed


def test_gloo_peer_failures_without_a_backend_name_count_as_collective_failures():
    """Errors gloo raises inside DDP's backward when a peer hangs ("Application timeout caused pair closure",
    "Timed out waiting ... for recv") become the one-line distributed error; other errors stay tracebacks."""
    import torch.distributed as dist

    from training.run import _collective_failure

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        assert _collective_failure(RuntimeError("Application timeout caused pair closure"))
        assert _collective_failure(RuntimeError("Timed out waiting 20000ms for recv operation to complete"))
        assert _collective_failure(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error"))
        assert not _collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    finally:
        dist.destroy_process_group()
    assert not _collective_failure(RuntimeError("Application timeout caused pair closure"))  # not distributed
