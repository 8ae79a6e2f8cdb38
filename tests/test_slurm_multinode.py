"""SLURM across two nodes: `slurm/local_cluster.sh start --nodes 2` runs two slurmd, each in its own network, UTS
and mount namespace on a bridge, so that a job's ranks rendezvous over a network between two hosts with their own
names and addresses. slurm/submit.py jobs train there, are requeued, lose a rank or a link, or get a wrong
MASTER_ADDR.

Every test gets a fresh two-node cluster and takes it down again, checking that no namespace, link, daemon, job
step or file is left. A local cluster running before the module (CI starts a one-node one for test_slurm.py) is
stopped first and started again afterwards. Needs root; skips otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_distributed_init import WORKER, check_two_rank_results
from test_slurm import TERMINAL_STATES, job_info, logged_epochs, run, task_log, wait_for_job

from slurm import submit
from training.distributed import slurm_master_port

REPO = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = REPO / "slurm" / "local_cluster.sh"
MARKER = "# Written by pvt-detr slurm/local_cluster.sh"
NET = os.environ.get("SLURM_LOCAL_NET", "10.213.0")  # the cluster's /24 (local_cluster.sh's default)
NODES = ["pvtnode1", "pvtnode2"]
DIST_TIMEOUT = 20  # --dist_timeout of the fault tests, seconds
GLOBAL_BATCH = 8  # images per step over all ranks: 2 ranks x 4, 4 ranks x 2, or one process x 8
SLURM_DAEMONS = {"slurmctld", "slurmd", "slurmstepd", "slurmscriptd"}
INIT_LINE = re.compile(r"\| distributed init: rank (\d+)/(\d+) \(local (\d+), gloo, torchrun(?:, SLURM restart \d+)?\) "
                       r"on (\S+) at tcp://(\S+):(\d+)")

pytestmark = [pytest.mark.slurm, pytest.mark.multinode]


def cluster_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run(["bash", str(LOCAL_CLUSTER), *args], timeout=timeout)


def demo_flags(data_dir: Path, epochs: int, train_images: int, batch_size: int,
               dist_timeout: int = DIST_TIMEOUT) -> list[str]:
    """main.py flags: the demo configuration, shrunk (single-threaded, no workers, no drawings)."""
    return ["--config", "configs/demo.yaml", "--coco_path", str(data_dir), "--epochs", str(epochs),
            "--demo_train_images", str(train_images), "--demo_val_images", "16", "--batch_size", str(batch_size),
            "--num_workers", "0", "--num_threads", "1", "--device", "cpu", "--plot_predictions", "0",
            "--dist_timeout", str(dist_timeout)]


def submit_job(job_dir: Path, flags: list[str], tasks_per_node: int = 1) -> str:
    """Submits main.py over both nodes through slurm/submit.py (CPU tasks, gloo); returns the job id."""
    args = submit.parse_args(["--nodes", "2", "--ngpus", "0", "--ntasks_per_node", str(tasks_per_node),
                              "--cpus_per_task", "1", "--partition", "debug", "--timeout", "60",
                              "--job_dir", str(job_dir), *flags])
    return submit.submit(args).job_id


def init_lines(job_dir: Path, job_id: str, ranks: int) -> list[tuple[int, int, int, str, str, int]]:
    """(rank, world size, local rank, host, master host, master port) of each task's last init line."""
    found = []
    for task in range(ranks):
        matches = INIT_LINE.findall(task_log(job_dir, job_id, task))
        assert matches, f"no init line in task {task}'s log: {task_log(job_dir, job_id, task)[-2000:]}"
        rank, world, local, host, master, port = matches[-1]
        found.append((int(rank), int(world), int(local), host, master, int(port)))
    return found


def task_pid(node: str) -> int:
    """The pid of the training task (submitit's runner; not srun or slurmstepd) running on `node`."""
    pids = run(["ip", "netns", "pids", node], timeout=30).stdout.split()
    tasks = []
    for pid in pids:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if comm.startswith("python") and b"submitit.core._submit" in cmdline:
            tasks.append(int(pid))
    assert len(tasks) == 1, f"expected one training task on {node}, found {tasks}"
    return tasks[0]


def wait_for_text(path_fn, pattern: str, job_id: str, timeout: float) -> str:
    """Polls `path_fn()` (a log's text) until it has a line matching `pattern`; returns the line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path_fn().splitlines():
            if re.match(pattern, line):
                return line
        time.sleep(0.2)
    pytest.fail(f"no line matching {pattern!r} after {timeout:.0f} s (job {job_id}: "
                f"{job_info(job_id).get('JobState')})")


def leftovers(run_netns_existed: bool) -> list[str]:
    """What a stopped two-node cluster must not leave: namespaces, links, files, daemons, job steps and tasks."""
    found = [f"network namespace {name}" for name in run(["ip", "netns", "list"], timeout=30).stdout.split()
             if name.startswith("pvtnode")]
    links = [line.split(": ")[1].split("@")[0] for line in run(["ip", "-o", "link"], timeout=30).stdout.splitlines()]
    found += [f"link {name}" for name in links if name.startswith(("pvtbr", "pvtveth"))]
    found += [f"file {path}" for path in Path("/etc").glob("netns/pvtnode*")]
    if not run_netns_existed and Path("/run/netns").exists():
        found.append("folder /run/netns")
    conf = Path("/etc/slurm/slurm.conf")
    if conf.exists() and "pvtctl" in conf.read_text():
        found.append(f"two-node {conf}")
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            comm = (proc / "comm").read_text().strip()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if comm in SLURM_DAEMONS or b"submitit.core._submit" in cmdline:
            found.append(f"process {proc.name} ({comm})")
    return found


# ---------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def own_host():
    """Root and the tools; stops a local cluster running before (restarting it at the end). Yields whether
    /run/netns existed before (`ip netns add` creates it; stop removes it again)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the two-node cluster uses network namespaces (sudo slurm/local_cluster.sh ...)")
    missing = [tool for tool in ("unshare", "nsenter") if shutil.which(tool) is None]
    if missing:  # (local_cluster.sh installs ip, from iproute2, itself)
        pytest.skip(f"needs {', '.join(missing)} (util-linux)")
    restart: list[str] = []
    conf = Path("/etc/slurm/slurm.conf")
    if shutil.which("scontrol") and conf.exists():
        status = cluster_script("status", timeout=60)
        if "slurmctld: running" in status.stdout:
            if MARKER not in conf.read_text():
                pytest.skip("a SLURM cluster not started by slurm/local_cluster.sh is running")
            jobs = run(["squeue", "-h", "-o", "%i"], timeout=30).stdout.split()
            if jobs:
                pytest.skip(f"the local cluster has jobs ({' '.join(jobs)}); not replacing it")
            restart = ["start", "--nodes", str(len(re.findall(r"^node \S+:", status.stdout, re.M)) or 1)]
            assert cluster_script("stop").returncode == 0
    yield Path("/run/netns").exists()
    if restart:
        proc = cluster_script(*restart)
        assert proc.returncode == 0, proc.stderr


@pytest.fixture
def two_nodes(own_host, monkeypatch):
    """A fresh two-node cluster for one test; stopped afterwards, and nothing of it may be left. Jobs get this
    environment without SLURM/torchrun variables."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "SBATCH_", "SRUN_", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                            "LOCAL_RANK")):
            monkeypatch.delenv(name)
    proc = cluster_script("start", "--nodes", "2")
    if proc.returncode != 0:
        cluster_script("stop")  # what a failed start made
        pytest.fail(f"local_cluster.sh start --nodes 2 failed: {proc.stderr[-3000:]}")
    yield
    stop = cluster_script("stop")
    assert stop.returncode == 0, stop.stderr
    assert leftovers(own_host) == []


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """One process, one epoch of the shrunk demo over the global batch; returns (data dir, output dir)."""
    root = tmp_path_factory.mktemp("one_process")
    data, out = root / "data", root / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                     "MASTER_ADDR", "MASTER_PORT"))}
    proc = subprocess.run([sys.executable, str(REPO / "main.py"), *demo_flags(data, 1, 64, GLOBAL_BATCH),
                           "--output_dir", str(out)], cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, out


# ---------------------------------------------------------------------------------------------------------------
# The cluster


def test_start_status_shell_stop_leave_nothing_behind(own_host):
    start = time.monotonic()
    proc = cluster_script("start", "--nodes", "2")
    started = time.monotonic() - start
    try:
        assert proc.returncode == 0, proc.stderr
        status = cluster_script("status", timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        for i, node in enumerate(NODES, start=1):
            assert re.search(rf"^slurmd {node}: running \(pid \d+, {NET}\.{10 + i} in network namespace {node}\)$",
                             status.stdout, re.M), status.stdout
            assert f"node {node}: idle" in status.stdout
        # Each node has its own hostname and address, and resolves the other's name to it.
        on_node2 = cluster_script("shell", "pvtnode2", "sh", "-c", "hostname; getent hosts pvtnode1 pvtnode2 pvtctl",
                                  timeout=60)
        assert on_node2.stdout.split() == ["pvtnode2", f"{NET}.11", "pvtnode1", f"{NET}.12", "pvtnode2",
                                           f"{NET}.1", "pvtctl"], on_node2.stdout + on_node2.stderr
        hosts = run(["srun", "--nodes", "2", "--ntasks-per-node", "1", "hostname"], timeout=120)
        assert sorted(hosts.stdout.split()) == NODES, hosts.stderr
        # A second start leaves the running cluster alone; another size is refused.
        assert cluster_script("start", "--nodes", "2").returncode == 0
        refused = cluster_script("start")
        assert refused.returncode == 1 and "a 2-node cluster is running; stop it first" in refused.stderr
    finally:
        start = time.monotonic()
        stop = cluster_script("stop")
        stopped = time.monotonic() - start
    assert stop.returncode == 0, stop.stderr
    assert leftovers(own_host) == []
    assert cluster_script("stop").returncode == 0  # a second stop finds nothing to do
    assert leftovers(own_host) == []
    # Both nodes were idle at once, and every daemon exits within about 2 s of SIGTERM (stop waits up to 30 s).
    assert started < 30 and stopped < 30, (started, stopped)


def test_srun_ranks_on_two_hosts_form_a_gloo_group(two_nodes):
    proc = run(["srun", "--nodes", "2", "--ntasks-per-node", "1", sys.executable, "-c", WORKER], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines()
                      if line.startswith("RESULT ")), key=lambda r: r["rank"])
    check_two_rank_results(results)
    # Both ranks announce themselves before print is silenced: each on its own host, rank 0's host as master.
    announced = sorted(re.findall(r"\| distributed init: rank (\d)/2 \(local 0, gloo, slurm\) on (\S+) at "
                                  r"tcp://(\S+):2\d{4}", proc.stdout))
    assert announced == [("0", "pvtnode1", "pvtnode1"), ("1", "pvtnode2", "pvtnode1")], proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# Training across the nodes


@pytest.mark.slow
@pytest.mark.parametrize("tasks_per_node", [1, 2])
def test_two_node_job_trains_like_one_process(two_nodes, reference, tmp_path, tasks_per_node):
    data, one = reference
    ranks = 2 * tasks_per_node
    job_dir = tmp_path / "job"
    job_id = submit_job(job_dir, demo_flags(data, 1, 64, GLOBAL_BATCH // ranks), tasks_per_node)
    info = wait_for_job(job_id, timeout=600)
    assert info["JobState"] == "COMPLETED", task_log(job_dir, job_id, 0, "err")[-3000:]

    # Rank r runs on node 1 + r // tasks_per_node (SLURM's block distribution); rank 0's host is the master.
    lines = init_lines(job_dir, job_id, ranks)
    assert lines == [(r, ranks, r % tasks_per_node, NODES[r // tasks_per_node], "pvtnode1", slurm_master_port(job_id))
                     for r in range(ranks)]
    assert {line[3] for line in lines} == set(NODES)

    log_one = json.loads((one / "log.txt").read_text().splitlines()[-1])
    log_job = json.loads((job_dir / "log.txt").read_text().splitlines()[-1])
    assert log_one["train_steps"] == log_job["train_steps"] == 8  # 64 images / 8 per step
    for key in ("train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou"):
        assert log_job[key] == pytest.approx(log_one[key], rel=1e-6), key
    # The whole parameter vector within 1e-6 relative (observed 2e-8), as tests/test_distributed_training.py.
    single = torch.load(one / "checkpoint.pth", weights_only=True)["model"]
    multi = torch.load(job_dir / "checkpoint.pth", weights_only=True)["model"]
    assert multi.keys() == single.keys()
    diff = torch.cat([(multi[k] - v).flatten().double() for k, v in single.items()]).norm()
    scale = torch.cat([v.flatten().double() for v in single.values()]).norm()
    assert diff / scale < 1e-6, (diff / scale).item()
    assert log_job["test_coco_eval_bbox"] == pytest.approx(log_one["test_coco_eval_bbox"], abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Faults


@pytest.mark.slow
@pytest.mark.parametrize("how", ["scontrol_requeue", "preempted_by_high_partition"])
def test_requeued_two_node_job_resumes_with_the_epoch_count(two_nodes, tmp_path, how):
    job_dir, epochs = tmp_path / "job", 5
    job_id = submit_job(job_dir, demo_flags(tmp_path / "data", epochs, 64, 4))
    checkpoint = job_dir / "checkpoint.pth"
    wait_for_job(job_id, timeout=300, until=lambda info: checkpoint.exists() or info["JobState"] in TERMINAL_STATES)
    state = job_info(job_id)["JobState"]
    assert state == "RUNNING", f"job {state} before its requeue: {task_log(job_dir, job_id, 0, 'err')[-3000:]}"
    if how == "scontrol_requeue":
        run(["scontrol", "requeue", job_id], timeout=30).check_returncode()
    else:  # a job of the `high` partition needs both nodes whole: SLURM requeues ours
        cpus = run(["sinfo", "-h", "-n", "pvtnode1", "-o", "%c"], timeout=30).stdout.split()[0]
        run(["sbatch", "--partition", "high", "--nodes", "2", "--ntasks-per-node", "1", "--cpus-per-task", cpus,
             "--output", "/dev/null", "--wrap", "sleep 2"], timeout=30).check_returncode()

    info = wait_for_job(job_id, timeout=600)
    out = task_log(job_dir, job_id, 0)
    assert info["JobState"] == "COMPLETED", task_log(job_dir, job_id, 0, "err")[-3000:]
    assert int(info["Restarts"]) == 1
    assert re.search(rf"resumed from {re.escape(str(checkpoint))}: epoch [1-4], step \d+", out), out[-3000:]
    assert logged_epochs(job_dir) == list(range(epochs))  # the epoch count continues; none is trained twice
    # The restarted job spans both nodes again.
    restarted = [INIT_LINE.findall(task_log(job_dir, job_id, task)) for task in range(2)]
    assert [(lines[-1][0], lines[-1][3]) for lines in restarted] == [("0", "pvtnode1"), ("1", "pvtnode2")]
    assert all("SLURM restart 1" in task_log(job_dir, job_id, task) for task in range(2))


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["task_killed", "link_cut", "node_lost"])
def test_losing_a_node_mid_epoch_ends_the_job_in_time_and_resume_finishes(two_nodes, tmp_path, fault):
    """Right after the first epoch's checkpoint, node 2's rank is SIGKILLed (task_killed), node 2's link goes down
    (link_cut), or every process of node 2 is SIGKILLed, its slurmd included (node_lost): rank 0 leaves within
    --dist_timeout with the one-line error, checkpoint.pth stays the last complete one, and the same submission
    with --resume auto finishes the run."""
    job_dir, epochs = tmp_path / "job", 4
    flags = demo_flags(tmp_path / "data", epochs, 96, 4)  # 12 steps per epoch
    job_id = submit_job(job_dir, flags)
    checkpoint = job_dir / "checkpoint.pth"
    wait_for_job(job_id, timeout=300, until=lambda info: checkpoint.exists() or info["JobState"] in TERMINAL_STATES)
    assert job_info(job_id)["JobState"] == "RUNNING", task_log(job_dir, job_id, 0, "err")[-3000:]
    if fault == "task_killed":
        os.kill(task_pid("pvtnode2"), signal.SIGKILL)
    elif fault == "link_cut":
        run(["ip", "link", "set", "pvtveth2", "down"], timeout=30).check_returncode()
    else:
        for pid in run(["ip", "netns", "pids", "pvtnode2"], timeout=30).stdout.split():
            os.kill(int(pid), signal.SIGKILL)
    start = time.monotonic()
    try:
        line = wait_for_text(lambda: task_log(job_dir, job_id, 0, "err"), r"error: rank 0: ", job_id,
                             timeout=DIST_TIMEOUT + 60)
        elapsed = time.monotonic() - start
    finally:
        if fault == "link_cut":
            run(["ip", "link", "set", "pvtveth2", "up"], timeout=30).check_returncode()
    assert line.startswith("error: rank 0: a distributed operation failed, another process probably died or timed "
                           f"out (--dist_timeout {DIST_TIMEOUT} s): "), line
    assert elapsed < DIST_TIMEOUT + 30, elapsed
    if fault == "node_lost":
        # SLURM waits for the lost node's tasks (until SlurmdTimeout): cancel the job and bring the node back.
        run(["scancel", job_id], timeout=30).check_returncode()
        restart = cluster_script("start", "--nodes", "2")
        assert restart.returncode == 0 and "restarting the slurmd of pvtnode2" in restart.stderr, restart.stderr
    info = wait_for_job(job_id, timeout=120)
    err = task_log(job_dir, job_id, 0, "err")
    assert info["JobState"] == ("CANCELLED" if fault == "node_lost" else "FAILED")
    assert "Traceback" not in err and [e for e in err.splitlines() if e.startswith("error: ")] == [line]

    # checkpoint.pth is the last epoch-end checkpoint: it loads and follows the last epoch rank 0 logged.
    trained = [int(n) for n in re.findall(r"^epoch (\d+): train loss", task_log(job_dir, job_id, 0), re.M)]
    state = torch.load(checkpoint, weights_only=True)
    assert (state["epoch"], state["step"]) == (trained[-1] + 1, 0)
    assert state["epoch"] < epochs, "the fault came after the last epoch"
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()

    resumed = submit_job(job_dir, [*flags, "--resume", "auto"])
    info = wait_for_job(resumed, timeout=600)
    assert info["JobState"] == "COMPLETED", task_log(job_dir, resumed, 0, "err")[-3000:]
    out = task_log(job_dir, resumed, 0)
    assert f"resumed from {checkpoint}: epoch {state['epoch']}, step 0" in out, out[-3000:]
    assert logged_epochs(job_dir) == list(range(epochs))
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() != digest  # the resumed run went on writing it


@pytest.mark.slow
def test_wrong_master_addr_fails_in_time_naming_it(two_nodes, tmp_path, monkeypatch):
    """MASTER_ADDR given by hand (exported at submission) that no node has: both ranks fail with one line naming
    the address and port instead of hanging."""
    wrong = f"{NET}.99"
    monkeypatch.setenv("MASTER_ADDR", wrong)
    job_dir, timeout = tmp_path / "job", 10
    job_id = submit_job(job_dir, demo_flags(tmp_path / "data", 1, 16, 4, dist_timeout=timeout))
    wait_for_job(job_id, timeout=120, until=lambda info: info["JobState"] != "PENDING")
    start = time.monotonic()
    info = wait_for_job(job_id, timeout=timeout + 60)
    assert time.monotonic() - start < timeout + 30
    assert info["JobState"] == "FAILED"
    port = slurm_master_port(job_id)
    expected = [rf"error: rank 0 on pvtnode1: the rendezvous at {re.escape(wrong)}:{port} failed after \d+ s "
                rf"\(--dist_timeout {timeout} s\): ",
                rf"error: rank 1 on pvtnode2: cannot reach the rendezvous at {re.escape(wrong)}:{port} "
                rf"\(MASTER_ADDR:MASTER_PORT, rank 0's host\) within --dist_timeout {timeout} s: "]
    for task, pattern in enumerate(expected):
        err = task_log(job_dir, job_id, task, "err")
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and re.match(pattern, errors[0]), err[-3000:]
        assert "Traceback" not in err
    assert not (tmp_path / "data").exists()  # nothing ran before the rendezvous

