"""training/distributed.py: launcher environments -> DistEnv, node lists, devices, rendezvous errors, and a real
2-process gloo group."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training import distributed as dist_utils
from training.distributed import DistEnv, DistributedSetupError, job_hostnames, read_dist_env

REPO = Path(__file__).resolve().parents[1]
_LAUNCHER_PREFIXES = ("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# What srun exports to task 1 of `srun -n 2` (as observed on the local cluster), on a 4-node job.
SLURM_TASK = {
    "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "node[1-3,5]", "SLURM_STEP_NODELIST": "node[1-3,5]",
}


def clean_environ(**extra: str) -> dict[str, str]:
    """os.environ without launcher variables (the tests may themselves run inside a SLURM job), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    return {**env, **extra}


# A stand-in for SLURM's scontrol: `scontrol show hostnames LIST` prints the expansions SLURM gives for the lists
# below (checked against the real scontrol in test_real_scontrol_expands_like_the_stand_in) and logs its arguments.
SCONTROL_EXPANSIONS = {
    "node[1-3,5]": ["node1", "node2", "node3", "node5"],
    "gpu[08-10],login": ["gpu08", "gpu09", "gpu10", "login"],
}
FAKE_SCONTROL = """#!/usr/bin/env python3
import json, sys
with open(sys.argv[0] + ".calls", "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
expansions = {expansions!r}
if sys.argv[1:3] != ["show", "hostnames"] or sys.argv[3] not in expansions:
    sys.exit("scontrol: error: Unable to create hostlist from " + sys.argv[-1])
print("\\n".join(expansions[sys.argv[3]]))
"""


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch) -> Path:
    """Puts the stand-in scontrol first on PATH; returns its path (its calls are logged to <path>.calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(FAKE_SCONTROL.format(expansions=SCONTROL_EXPANSIONS))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return script


@pytest.fixture
def no_scontrol(tmp_path, monkeypatch) -> None:
    """A PATH on which no scontrol can be found."""
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


# ---------------------------------------------------------------------------------------------------------------
# read_dist_env


def test_no_launcher_is_single_process():
    assert read_dist_env({}) == DistEnv("single")
    assert not read_dist_env({}).distributed


def test_torchrun():
    env = read_dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0",
                         "MASTER_PORT": "29500"})
    assert env == DistEnv("torchrun", rank=3, world_size=8, local_rank=1, master_addr="n0", master_port=29500)
    assert env.distributed


def test_torchrun_wins_over_slurm():
    # torchrun started inside a SLURM allocation: the torchrun ranks are the real ones.
    env = read_dist_env({**SLURM_TASK, "RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "a",
                         "MASTER_PORT": "1234"})
    assert (env.launcher, env.rank, env.world_size) == ("torchrun", 0, 4)


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "0"}, "incomplete torchrun environment: RANK set but WORLD_SIZE, LOCAL_RANK missing"),
    ({"RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE missing"),
    ({"LOCAL_RANK": "0"}, "LOCAL_RANK set but RANK, WORLD_SIZE missing"),
    ({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, "rank 4, world size 4"),
    ({"RANK": "x", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, "RANK='x' is not an integer"),
])
def test_partial_or_inconsistent_torchrun_is_a_one_line_error(environ, message):
    with pytest.raises(DistributedSetupError, match=message) as info:
        read_dist_env(environ)
    assert "\n" not in str(info.value)


def test_slurm_task(fake_scontrol):
    env = read_dist_env({**SLURM_TASK, "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_RESTART_COUNT": "2"})
    assert env == DistEnv("slurm", rank=5, world_size=8, local_rank=1, master_addr="node1",
                          master_port=20000 + 4242, restart_count=2)


def test_slurm_master_overrides():
    env = read_dist_env({**SLURM_TASK, "MASTER_ADDR": "head", "MASTER_PORT": "31000"})
    assert (env.master_addr, env.master_port) == ("head", 31000)


def test_slurm_port_from_job_id():
    assert dist_utils.slurm_master_port(4242) == 24242
    assert dist_utils.slurm_master_port("123456") == 20000 + 123456 % 20000
    assert 20000 <= dist_utils.slurm_master_port("987654321") < 40000


def test_bare_srun_with_one_task_is_single_process():
    env = read_dist_env({**SLURM_TASK, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1"})
    assert env == DistEnv("slurm") and not env.distributed


def test_srun_task_without_ntasks_is_a_one_line_error():
    environ = {k: v for k, v in SLURM_TASK.items() if k != "SLURM_NTASKS"}
    with pytest.raises(DistributedSetupError, match="SLURM_PROCID is set but SLURM_NTASKS is missing") as info:
        read_dist_env(environ)
    assert "\n" not in str(info.value)


def test_srun_task_without_localid_is_an_error():
    environ = {k: v for k, v in SLURM_TASK.items() if k != "SLURM_LOCALID"}
    with pytest.raises(DistributedSetupError, match="SLURM_LOCALID is missing"):
        read_dist_env(environ)


def test_plain_sbatch_script_is_single_process():
    # `sbatch job.sh` running python directly: SLURM sets SLURM_PROCID=0 but neither SLURM_NTASKS nor a step.
    env = read_dist_env({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n1"})
    assert env == DistEnv("slurm")


def test_multi_task_sbatch_script_without_srun_is_an_error():
    with pytest.raises(DistributedSetupError, match="batch script of a 2-task SLURM job: start the tasks with `srun"):
        read_dist_env({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"})


def test_interactive_salloc_shell_is_single_process():
    environ = {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert read_dist_env(environ) == DistEnv("single")


# ---------------------------------------------------------------------------------------------------------------
# Node lists: scontrol, else submitit's SLURM job environment, else a one-line error


@pytest.mark.parametrize("nodelist", sorted(SCONTROL_EXPANSIONS))
def test_job_hostnames_asks_scontrol(fake_scontrol, nodelist):
    assert job_hostnames(nodelist) == SCONTROL_EXPANSIONS[nodelist]
    assert dist_utils.first_host(nodelist) == SCONTROL_EXPANSIONS[nodelist][0]
    calls = [json.loads(line) for line in Path(f"{fake_scontrol}.calls").read_text().splitlines()]
    assert calls == [["show", "hostnames", nodelist]] * 2


def test_real_scontrol_expands_like_the_stand_in():
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol not installed")
    probe = subprocess.run(["scontrol", "show", "hostnames", "a[1-2]"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"scontrol cannot run here: {probe.stderr.strip().splitlines()[-1:]}")
    for nodelist, hosts in SCONTROL_EXPANSIONS.items():
        assert job_hostnames(nodelist) == hosts


def test_job_hostnames_without_scontrol_uses_submitit_for_the_jobs_own_list(no_scontrol, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[08-10],login")
    assert job_hostnames("gpu[08-10],login") == SCONTROL_EXPANSIONS["gpu[08-10],login"]


def test_job_hostnames_without_scontrol_for_another_list_is_a_one_line_error(no_scontrol, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "other[1-2]")
    with pytest.raises(DistributedSetupError) as info:
        job_hostnames("node[1-3,5]")
    assert str(info.value) == "cannot expand the SLURM node list 'node[1-3,5]' (scontrol not found); set MASTER_ADDR"


def test_job_hostnames_reports_a_failing_scontrol(fake_scontrol, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    with pytest.raises(DistributedSetupError) as info:
        job_hostnames("bad[")
    assert str(info.value) == ("cannot expand the SLURM node list 'bad[' (scontrol: error: Unable to create hostlist "
                               "from bad[); set MASTER_ADDR")


def test_slurm_task_whose_node_list_cannot_be_expanded_is_an_error(no_scontrol, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    with pytest.raises(DistributedSetupError, match=r"cannot expand the SLURM node list 'node\[1-3,5\]'"):
        read_dist_env(SLURM_TASK)
    # MASTER_ADDR given by hand needs no expansion.
    assert read_dist_env({**SLURM_TASK, "MASTER_ADDR": "head"}).master_addr == "head"


# ---------------------------------------------------------------------------------------------------------------
# Devices and single-process helpers


def test_resolve_device():
    assert dist_utils.resolve_device("cpu", 3) == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert dist_utils.resolve_device("auto", 0) == expected
    with pytest.raises(DistributedSetupError, match="unknown device 'tpu'"):
        dist_utils.resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(DistributedSetupError, match="--device cuda requested but CUDA is not available"):
        dist_utils.resolve_device("cuda", 0)


def test_single_process_init_and_helpers(monkeypatch):
    for name in list(os.environ):
        if name.startswith(_LAUNCHER_PREFIXES):
            monkeypatch.delenv(name)
    args = argparse.Namespace(device="cpu", dist_url="env://", dist_timeout=10)
    assert dist_utils.init_distributed_mode(args) == torch.device("cpu")
    assert (args.rank, args.world_size, args.local_rank, args.gpu, args.distributed) == (0, 1, 0, 0, False)
    assert args.dist_backend == "gloo"
    assert (dist_utils.get_rank(), dist_utils.get_world_size(), dist_utils.is_main_process()) == (0, 1, True)
    losses = {"loss_ce": torch.tensor(1.5), "loss_bbox": torch.tensor(0.5)}
    assert dist_utils.reduce_dict(losses) == losses
    assert torch.equal(dist_utils.all_reduce_sum(torch.tensor([2.0, 3.0])), torch.tensor([2.0, 3.0]))
    assert dist_utils.all_gather_object({"a": 1}) == [{"a": 1}]
    dist_utils.barrier()
    dist_utils.cleanup()


def test_relative_file_url_is_rejected():
    with pytest.raises(DistributedSetupError, match="relative"):
        dist_utils.check_dist_url("file://exp/init")
    assert dist_utils.check_dist_url("file:///shared/exp/init") == "file:///shared/exp/init"


# ---------------------------------------------------------------------------------------------------------------
# A real 2-process gloo group on 127.0.0.1

WORKER = """
import argparse, json, torch
from training import distributed as d
args = argparse.Namespace(device="cpu", dist_url="env://", dist_timeout=60)
d.init_distributed_mode(args)
r = args.rank
out = {
    "rank": r, "world_size": args.world_size, "local_rank": args.local_rank, "distributed": args.distributed,
    "get_rank": d.get_rank(), "main": d.is_main_process(),
    "sum": d.all_reduce_sum(torch.tensor([r + 1.0, 10.0])).tolist(),
    "mean": {k: v.item() for k, v in d.reduce_dict({"b": torch.tensor(float(r)), "a": torch.tensor(4.0 * r)}).items()},
    "total": {k: v.item() for k, v in d.reduce_dict({"n": torch.tensor(r + 1.0)}, average=False).items()},
    "gathered": d.all_gather_object({"rank": r, "tag": "p%d" % r}),
}
print("silenced on rank 1")
d.cleanup()
print("RESULT " + json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(envs: list[dict[str, str]], timeout: float = 60) -> list[dict]:
    """Runs WORKER once per environment, all at once; returns each one's RESULT (deadline-bounded)."""
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for env in envs]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert proc.returncode == 0, stderr[-3000:]
            outputs.append(stdout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = []
    for stdout in outputs:
        results.append({**json.loads(stdout.split("RESULT ", 1)[1]), "stdout": stdout})
        assert ("silenced on rank 1" in stdout) == (results[-1]["rank"] == 0)
    return results


def check_two_rank_results(results: list[dict]) -> None:
    for rank, res in enumerate(results):
        assert res["rank"] == res["get_rank"] == rank
        assert res["world_size"] == 2 and res["distributed"] and res["main"] == (rank == 0)
        assert res["sum"] == [3.0, 20.0]  # (0 + 1) + (1 + 1), 10 + 10
        assert res["mean"] == {"a": 2.0, "b": 0.5}
        assert res["total"] == {"n": 3.0}
        assert res["gathered"] == [{"rank": 0, "tag": "p0"}, {"rank": 1, "tag": "p1"}]


def test_two_process_gloo_torchrun_env():
    port = str(free_port())
    envs = [clean_environ(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            for r in range(2)]
    results = run_workers(envs)
    check_two_rank_results(results)
    assert [r["local_rank"] for r in results] == [0, 1]
    for rank, result in enumerate(results):  # each rank's one line names its host
        assert (f"| distributed init: rank {rank}/2 (local {rank}, gloo, torchrun) on {socket.gethostname()} at "
                f"tcp://127.0.0.1:{port}\n") in result["stdout"]


def test_two_process_gloo_slurm_env():
    # The variables srun gives two tasks on one node (the real srun run is in test_slurm.py).
    port = str(free_port())
    envs = [clean_environ(SLURM_JOB_ID="99", SLURM_STEP_ID="0", SLURM_PROCID=str(r), SLURM_NTASKS="2",
                          SLURM_LOCALID=str(r), SLURM_JOB_NODELIST="localhost", MASTER_PORT=port) for r in range(2)]
    check_two_rank_results(run_workers(envs))


# ---------------------------------------------------------------------------------------------------------------
# A rendezvous that cannot complete: one line naming the address, within --dist_timeout


def test_rank_that_cannot_reach_the_master_fails_in_time_with_the_address(monkeypatch):
    # Rank 1 of 2 while nothing listens at MASTER_ADDR:MASTER_PORT (rank 0 absent, or the address wrong).
    for name in list(os.environ):
        if name.startswith(_LAUNCHER_PREFIXES):
            monkeypatch.delenv(name)
    port = free_port()
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    args = argparse.Namespace(device="cpu", dist_url="env://", dist_timeout=3)
    start = time.monotonic()
    with pytest.raises(DistributedSetupError) as info:
        dist_utils.init_distributed_mode(args)
    elapsed = time.monotonic() - start
    assert str(info.value) == (f"rank 1 on {socket.gethostname()}: cannot reach the rendezvous at 127.0.0.1:{port} "
                               "(MASTER_ADDR:MASTER_PORT, rank 0's host) within --dist_timeout 3 s: Connection refused")
    assert 3 <= elapsed < 5, elapsed
    assert not torch.distributed.is_initialized()


def test_main_whose_peers_never_come_exits_with_one_line(tmp_path):
    # main.py as rank 0 of 2 with no rank 1: the rendezvous times out; the last stderr line names the address.
    from test_main_cli import TINY

    port = free_port()
    env = clean_environ(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "main.py"), *TINY, "--device", "cpu", "--dist_timeout", "3",
                           "--coco_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    prefix = f"error: rank 0 on {socket.gethostname()}: the rendezvous at 127.0.0.1:{port} failed after "
    assert last.startswith(prefix) and "(--dist_timeout 3 s): " in last, last
    assert "1/2 clients joined" in last, last
    assert elapsed < 60, elapsed  # python + torch start-up, then the 3 s rendezvous (torch adds ~1 s)
    assert not (tmp_path / "data").exists()  # nothing is done before the group forms
