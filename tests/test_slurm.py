"""SLURM: the local cluster script, distributed init under a real srun, and slurm/submit.py end to end.

The `slurm`-marked tests need a running cluster: `sudo slurm/local_cluster.sh start` (they skip otherwise).
They submit real jobs (real slurmctld/slurmd, real submitit, the real main.py on the demo config) and wait for
them with deadlines, cancelling whatever they started.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit
from test_distributed_init import WORKER, check_two_rank_results

from slurm import submit

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "slurm" / "submit.py"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE"}


def job_environ() -> dict[str, str]:
    """This environment without SLURM/torchrun variables, so srun/sbatch make a new allocation."""
    prefixes = ("SLURM_", "SBATCH_", "SRUN_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def run(cmd: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=job_environ(), **kwargs)


@pytest.fixture(scope="module")
def cluster():
    """Skips unless a SLURM controller answers and its node can run jobs."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        pytest.skip("SLURM not installed (start the local cluster: sudo slurm/local_cluster.sh start)")
    try:
        ping = run(["scontrol", "ping"], timeout=20).stdout
        states = run(["sinfo", "-h", "-o", "%T"], timeout=20).stdout.split()
    except subprocess.TimeoutExpired:
        pytest.skip("SLURM controller does not answer (sudo slurm/local_cluster.sh start)")
    if "is UP" not in ping or not set(states) & {"idle", "mixed", "allocated", "completing"}:
        controller = (ping.strip().splitlines() or ["no controller"])[0]
        pytest.skip(f"SLURM cluster not usable ({controller}; nodes {states}): sudo slurm/local_cluster.sh start")


def job_info(job_id: str) -> dict[str, str]:
    out = run(["scontrol", "show", "job", "-o", job_id], timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for_job(job_id: str, timeout: float, until=None) -> dict[str, str]:
    """Polls scontrol until the job ends (or `until(info)` holds); fails with the job's logs on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if (until(info) if until else info.get("JobState") in TERMINAL_STATES):
            return info
        time.sleep(0.5)
    pytest.fail(f"job {job_id} not done after {timeout:.0f} s: {job_info(job_id).get('JobState')}")


def submit_cli(*flags: str) -> subprocess.CompletedProcess:
    return run([sys.executable, str(SUBMIT), *flags], timeout=120)


def submitted_job_id(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"Submitted job (\d+)", proc.stdout)
    assert match, proc.stdout
    return match.group(1)


def task_log(job_dir: Path, job_id: str, task: int, kind: str = "out") -> str:
    path = job_dir / "submitit" / f"{job_id}_{task}_log.{kind}"
    return path.read_text() if path.exists() else ""


def demo_flags(data_dir: Path, epochs: int, train_images: int) -> list[str]:
    """main.py flags for a tiny run of the demo config (the data is generated into data_dir). One thread per task
    (the demo config asks for 2): the jobs run 2 tasks on the node's cores."""
    return ["--config", "configs/demo.yaml", "--coco_path", str(data_dir), "--epochs", str(epochs),
            "--demo_train_images", str(train_images), "--demo_val_images", "8", "--batch_size", "4",
            "--num_workers", "0", "--num_threads", "1", "--device", "cpu", "--warmup_iters", "0",
            "--plot_predictions", "0", "--no_progress"]


def logged_epochs(job_dir: Path) -> list[int]:
    log = job_dir / "log.txt"
    return [json.loads(line)["epoch"] for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


@pytest.fixture
def cancel_jobs():
    """Collects job ids; cancels any still queued or running at the end of the test."""
    job_ids: list[str] = []
    yield job_ids
    if job_ids and shutil.which("scancel"):
        run(["scancel", *job_ids], timeout=30)


# ---------------------------------------------------------------------------------------------------------------
# The cluster and distributed init under real srun


@pytest.mark.slurm
def test_local_cluster_status(cluster):
    proc = run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "status"], timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "slurmctld: running" in proc.stdout and re.search(r"node localhost: (idle|mixed|allocated)", proc.stdout)


@pytest.mark.slurm
def test_srun_two_tasks_form_a_gloo_group(cluster):
    proc = run(["srun", "--ntasks", "2", "--cpus-per-task", "1", sys.executable, "-c", WORKER], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines()
                      if line.startswith("RESULT ")), key=lambda r: r["rank"])
    check_two_rank_results(results)
    # Rank 0's announcement (rank 1 is silenced afterwards but announces before): SLURM variables, derived port.
    assert re.search(r"distributed init: rank 0/2 \(local 0, gloo, slurm\) on \S+ at tcp://localhost:2\d{4}",
                     proc.stdout)


@pytest.mark.slurm
def test_bare_srun_is_a_single_process(cluster):
    code = ("import argparse; from training.distributed import init_distributed_mode as init; "
            "a = argparse.Namespace(device='cpu'); init(a); print('WORLD', a.world_size, a.distributed)")
    proc = run(["srun", sys.executable, "-c", code], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "WORLD 1 False" in proc.stdout


@pytest.mark.slurm
def test_srun_without_ntasks_is_a_one_line_error(cluster, tmp_path):
    # main.py under srun whose task lost SLURM_NTASKS: init_distributed_mode refuses before any work is done.
    cmd = ["srun", "env", "-u", "SLURM_NTASKS", sys.executable, "main.py", "--output_dir", str(tmp_path / "out"),
           *demo_flags(tmp_path / "data", epochs=1, train_images=16)]
    proc = run(cmd, timeout=120)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if not line.startswith("srun:")]
    assert ours == ["error: incomplete SLURM environment: SLURM_PROCID is set but SLURM_NTASKS is missing "
                    "(start the tasks with srun --ntasks N)"], proc.stderr
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------------------------------------------------------
# submit.py: argument errors, sbatch refusals, requeue arguments


@pytest.mark.parametrize("flags, message", [
    (["--job_dir", "exp/pvt_s"], "argument --job_dir: 'exp/pvt_s' is not absolute"),
    ([], "the following arguments are required: --job_dir"),
    (["--job_dir", "/tmp/x", "--ngpus", "2", "--ntasks_per_node", "1"], "one task per GPU"),
    (["--job_dir", "/tmp/x", "--ngpus", "0", "--device", "cuda"], "--device cuda with --ngpus 0"),
    (["--job_dir", "/tmp/x", "--dist_url", "file://exp/init"], "--dist_url file://exp/init is relative"),
    (["--job_dir", "/tmp/x", "--nodes", "0"], "argument --nodes: must be >= 1, got 0"),
    (["--job_dir", "/tmp/x", "--mem_gb", "nan"], "argument --mem_gb: must be a finite number, got nan"),
    (["--job_dir", "/tmp/x", "--lr", "inf"], "argument --lr: must be a finite number, got inf"),
])
def test_submit_argument_errors_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        submit.main(["--dataset_file", "demo", *flags])
    assert info.value.code == 1
    stderr = capsys.readouterr().err
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_checkpoint_requeues_with_resume(tmp_path):
    args = argparse.Namespace(output_dir=str(tmp_path), resume="", epochs=3)
    delayed = submit.Trainer(args).checkpoint()
    assert isinstance(delayed.function, submit.Trainer) and delayed.function.args.resume == ""
    (tmp_path / "checkpoint.pth").write_bytes(b"x")
    delayed = submit.Trainer(args).checkpoint()
    assert delayed.function.args.resume == str(tmp_path / "checkpoint.pth")
    assert args.resume == "" and delayed.function.args.epochs == 3  # the original arguments are untouched


@pytest.mark.slurm
@pytest.mark.parametrize("flags, message", [
    (["--partition", "no_such_partition"], "Invalid partition name specified"),
    (["--cpus_per_task", "999"], "More processors requested than permitted"),
])
def test_submit_refused_by_sbatch_is_one_line(cluster, tmp_path, flags, message, capsys):
    argv = ["--job_dir", str(tmp_path / "job"), "--ngpus", "0", "--timeout", "5", "--dataset_file", "demo", *flags]
    assert submit.main(argv) == 1
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: sbatch refused the job:") and message in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


# ---------------------------------------------------------------------------------------------------------------
# Real jobs


def _two_task_probe() -> dict:
    """Runs in each task of a submitit job: the launcher's environment and a collective over it."""
    import submitit as _submitit

    from slurm.submit import export_dist_env
    from training import distributed as dist_utils

    export_dist_env()
    args = argparse.Namespace(device="cpu", dist_url="env://", dist_timeout=60)
    dist_utils.init_distributed_mode(args)
    ranks = dist_utils.all_gather_object(args.rank)
    env = _submitit.JobEnvironment()
    dist_utils.cleanup()
    return {"procid": os.environ["SLURM_PROCID"], "rank": args.rank, "world_size": args.world_size,
            "local_rank": args.local_rank, "ranks": ranks, "master": os.environ["MASTER_ADDR"],
            "port": os.environ["MASTER_PORT"], "job_id": env.job_id}


@pytest.mark.slurm
def test_submitit_job_with_two_tasks(cluster, tmp_path, cancel_jobs):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the job need not import this test module
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(timeout_min=5, nodes=1, tasks_per_node=2, cpus_per_task=1,
                               slurm_setup=[f"export PYTHONPATH={REPO}"])
    job = executor.submit(_two_task_probe)
    cancel_jobs.append(job.job_id)
    deadline = time.monotonic() + 120
    while not job.done() and time.monotonic() < deadline:
        time.sleep(1)
    assert job.done(), f"job {job.job_id} not done: {job_info(job.job_id).get('JobState')}"
    results = sorted(job.results(), key=lambda r: r["rank"])
    assert [r["procid"] for r in results] == ["0", "1"]
    assert [(r["rank"], r["local_rank"], r["world_size"]) for r in results] == [(0, 0, 2), (1, 1, 2)]
    assert all(r["ranks"] == [0, 1] for r in results)
    assert {(r["master"], r["port"]) for r in results} == {("localhost", str(20000 + int(job.job_id) % 20000))}


@pytest.mark.slurm
@pytest.mark.slow
def test_submit_demo_two_cpu_tasks(cluster, tmp_path, cancel_jobs):
    job_dir = tmp_path / "job"
    proc = submit_cli("--job_dir", str(job_dir), "--ngpus", "0", "--ntasks_per_node", "2", "--cpus_per_task", "1",
                      "--timeout", "60", *demo_flags(tmp_path / "data", epochs=1, train_images=16))
    job_id = submitted_job_id(proc)
    cancel_jobs.append(job_id)
    assert f"{job_dir}/submitit/{job_id}_0_log.out" in proc.stdout
    info = wait_for_job(job_id, timeout=600)
    assert info["JobState"] == "COMPLETED", task_log(job_dir, job_id, 0, "err")[-3000:]
    assert logged_epochs(job_dir) == [0]
    assert (job_dir / "checkpoint.pth").is_file() and (job_dir / "final_stats.json").is_file()
    assert "output_dir: " + str(job_dir) in (job_dir / "config.yaml").read_text()
    for task in range(2):
        assert f"distributed init: rank {task}/2 (local {task}, gloo, torchrun)" in task_log(job_dir, job_id, task)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("how", ["usr2", "scontrol_requeue", "preempted_by_high_partition"])
def test_requeued_job_resumes_from_checkpoint(cluster, tmp_path, cancel_jobs, how):
    """Preempt a 2-task run after its first checkpoint: the requeued job resumes and the epochs continue.

    usr2: what SLURM sends before preemption/time limit (timeout 60 min so submitit calls it a preemption);
    training checkpoints, submitit calls Trainer.checkpoint and requeues the same job id.
    scontrol_requeue: SIGTERM then SIGKILL; submitit reruns the original pickle and Trainer resumes by itself.
    preempted_by_high_partition: a job in the `high` partition needs the node; SLURM requeues ours (as above).
    """
    job_dir = tmp_path / "job"
    # Long enough after the first checkpoint (4 epochs of 8 steps, 0.3-1 s each) that the preemption lands mid-run:
    # with 3 epochs of 4 steps the job could finish before the signal arrived (seen once in CI).
    epochs = 5
    proc = submit_cli("--job_dir", str(job_dir), "--ngpus", "0", "--ntasks_per_node", "2", "--cpus_per_task", "1",
                      "--timeout", "60", *demo_flags(tmp_path / "data", epochs=epochs, train_images=64))
    job_id = submitted_job_id(proc)
    cancel_jobs.append(job_id)
    checkpoint = job_dir / "checkpoint.pth"
    wait_for_job(job_id, timeout=600, until=lambda info: checkpoint.exists() or info["JobState"] in TERMINAL_STATES)
    state = job_info(job_id)["JobState"]
    assert state == "RUNNING", f"job {state} before its preemption: {task_log(job_dir, job_id, 0, 'err')[-3000:]}"
    if how == "usr2":
        run(["scancel", "--signal=USR2", job_id], timeout=30).check_returncode()
    elif how == "scontrol_requeue":
        run(["scontrol", "requeue", job_id], timeout=30).check_returncode()
    else:
        cpus = run(["sinfo", "-h", "-n", "localhost", "-o", "%c"], timeout=30).stdout.split()[0]
        high = run(["sbatch", "--parsable", "--partition", "high", "--cpus-per-task", cpus, "--output", "/dev/null",
                    "--wrap", "sleep 2"], timeout=30)
        high.check_returncode()
        cancel_jobs.append(high.stdout.strip())

    info = wait_for_job(job_id, timeout=900)
    out, err = task_log(job_dir, job_id, 0), task_log(job_dir, job_id, 0, "err")
    assert info["JobState"] == "COMPLETED", err[-3000:]
    assert int(info["Restarts"]) == 1
    assert re.search(rf"resumed from {re.escape(str(checkpoint))}: epoch [1-9]", out), out[-3000:]
    assert logged_epochs(job_dir) == list(range(epochs))  # epoch 0 is not trained twice
    if how == "usr2":
        assert "this job is preempted" in err and f"Requeuing, resuming from {checkpoint}" in out
