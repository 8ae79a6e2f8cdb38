"""Submit pvt-detr training to SLURM with submitit: DETR's run_with_submitit.py, with its known problems fixed.

    python slurm/submit.py --nodes 1 --ngpus 8 --partition P --timeout 4320 --job_dir /shared/exp/pvt_s \\
        --backbone pvt_small --coco_path /data/coco --pretrained_backbone pvt_small.pth
    python slurm/submit.py --ngpus 0 --ntasks_per_node 2 --cpus_per_task 1 --job_dir $PWD/out/demo \\
        --config configs/demo.yaml                                   # CPU-only partition, gloo

Every main.py flag is accepted and passed on. One SLURM task per GPU (`--ngpus 0`: `--ntasks_per_node` CPU
tasks per node). Checkpoints and logs go to --job_dir (it is main.py's --output_dir); submitit's files and the
per-task stdout/stderr go to <job_dir>/submitit/. On preemption or time-out SLURM sends USR2; submitit calls
`Trainer.checkpoint`, which requeues the same job id resuming from <job_dir>/checkpoint.pth, so the epoch count
continues. A plain `scontrol requeue` or a partition preemption sends SIGTERM instead, which submitit ignores:
training checkpoints if it can, SLURM kills and restarts the job from its original arguments, and `Trainer`
resumes from <job_dir>/checkpoint.pth because SLURM_RESTART_COUNT > 0.

Differences from DETR's launcher:
- --job_dir is required and absolute (no hard-coded shared folder, no relative file:// init URL);
- the rendezvous is env:// at the first node of the job, port 20000 + job id % 20000: no init file to go
  stale when a requeued job keeps its id;
- CPU-only partitions work (gloo); --mem_gb / --cpus_per_task default to the cluster's or to num_workers + 1,
  and each task runs OMP_NUM_THREADS=cpus_per_task threads (unless set);
- relative input paths (--coco_path, --resume, ...) are made absolute at submission;
- an sbatch refusal (unknown partition, impossible request) is a one-line error, not a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import shlex
import shutil
import sys
from pathlib import Path

import submitit

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pvt_detr.cli import OneLineParser, expand_path, number  # noqa: E402
from training.distributed import (  # noqa: E402
    DistributedSetupError,
    check_dist_url,
    first_host,
    read_dist_env,
    slurm_master_port,
)


class SubmissionError(RuntimeError):
    """The job could not be submitted (one-line message)."""


def _absolute_dir(text: str) -> Path:
    path = Path(expand_path(text))
    if not path.is_absolute():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not absolute: give a folder every node sees at the same path, e.g. $PWD/{text}"
        )
    return path


def build_parser() -> argparse.ArgumentParser:
    """submit.py's own flags on top of every main.py flag."""
    import main as pvt_main  # the repo's main.py

    parser = OneLineParser("submit.py", parents=[pvt_main.get_args_parser()],
                                 description="Submit pvt-detr training to SLURM (submitit).")
    group = parser.add_argument_group("SLURM")
    group.add_argument("--job_dir", required=True, type=_absolute_dir,
                       help="absolute shared folder: checkpoints, logs (= --output_dir), submitit/ files")
    group.add_argument("--nodes", default=1, type=number(int, 1, 100000), help="number of nodes")
    group.add_argument("--ngpus", default=8, type=number(int, 0, 1024),
                       help="GPUs per node, one task each (0 = CPU-only, gloo)")
    group.add_argument("--ntasks_per_node", default=None, type=number(int, 1, 1024),
                       help="tasks per node; with --ngpus > 0 it must equal --ngpus (default: ngpus, or 1 on CPU)")
    group.add_argument("--cpus_per_task", default=None, type=number(int, 1, 4096),
                       help="CPUs per task (default: --num_workers + 1)")
    group.add_argument("--mem_gb", default=None, type=number(float, 0, low_open=True),
                       help="memory per node in GB (default: the cluster's)")
    group.add_argument("--timeout", default=4320, type=number(int, 1, 10**7),
                       help="time limit in minutes; the job requeues after it")
    group.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    group.add_argument("--account", default=None, help="SLURM account")
    group.add_argument("--qos", default=None, help="SLURM quality of service")
    group.add_argument("--comment", default=None, help="SLURM job comment")
    group.add_argument("--constraint", default=None, help="SLURM node constraint, e.g. volta32gb")
    group.add_argument("--job_name", default="pvt-detr", help="SLURM job name")
    group.add_argument("--signal_delay_s", default=120, type=number(int, 0, 10**6),
                       help="USR2 this many seconds before the time limit, to checkpoint and requeue")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and validates submit.py + main.py flags (with --config applied like main.py does)."""
    from training.config import parse_args as parse_with_config  # main.py's YAML --config handling

    parser = build_parser()
    args = parse_with_config(parser, argv)
    if args.ntasks_per_node is None:
        args.ntasks_per_node = args.ngpus or 1
    if args.ngpus and args.ntasks_per_node != args.ngpus:
        parser.error(f"one task per GPU: --ntasks_per_node {args.ntasks_per_node} != --ngpus {args.ngpus}")
    if args.ngpus == 0:
        if args.device == "cuda":
            parser.error("--device cuda with --ngpus 0: request GPUs or use --device cpu")
        args.device = "cpu"
    if args.cpus_per_task is None:
        args.cpus_per_task = args.num_workers + 1
    if args.output_dir and Path(args.output_dir) != args.job_dir:
        print(f"submit.py: note: outputs go to --job_dir {args.job_dir}, not {args.output_dir}", file=sys.stderr)
    args.output_dir = str(args.job_dir)
    # The job may start in another directory (or on another node): pin input paths now.
    for name in ("coco_path", "pretrained_backbone", "finetune", "resume", "config"):
        value = getattr(args, name)
        if value and value != "auto":
            setattr(args, name, os.path.abspath(value))
    try:
        check_dist_url(args.dist_url)
    except DistributedSetupError as err:
        parser.error(str(err))
    return args


def export_dist_env() -> None:
    """Sets torchrun's variables for this SLURM task from submitit's view of the job, so that
    training.distributed.init_distributed_mode (called by main.main) joins the job's process group.

    Rank 0 runs on the job's first node (`scontrol show hostnames $SLURM_JOB_NODELIST`); MASTER_ADDR or
    MASTER_PORT already in the task's environment (given at submission: sbatch exports the submitter's
    environment) win, e.g. for nodes that reach each other under other names than SLURM's."""
    job_env = submitit.JobEnvironment()
    os.environ.update({
        "MASTER_ADDR": os.environ.get("MASTER_ADDR") or first_host(os.environ["SLURM_JOB_NODELIST"]),
        "MASTER_PORT": os.environ.get("MASTER_PORT") or str(slurm_master_port(job_env.raw_job_id)),
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
    })


class Trainer:
    """What every SLURM task runs: `main.main(args)`. Checkpointable the submitit way: on USR2 (preemption or
    time-out) submitit calls `checkpoint()` on rank 0 and requeues the job with the object it returns."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def __call__(self) -> dict:
        import main as pvt_main  # importable in the job: the sbatch script puts the repo on PYTHONPATH

        export_dist_env()
        args = self.args
        if read_dist_env().restart_count:
            # Requeued by SLURM itself (`scontrol requeue`, preemption without USR2): submitit restarts from the
            # original pickle, without the --resume that checkpoint() would have added.
            args = self._resuming_args()
        return pvt_main.main(args)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        new_args = self._resuming_args()
        print(f"Requeuing, resuming from {new_args.resume or 'scratch (no checkpoint.pth yet)'}", flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(new_args))

    def _resuming_args(self) -> argparse.Namespace:
        """The arguments with --resume <job_dir>/checkpoint.pth if that checkpoint exists."""
        args = copy.copy(self.args)
        checkpoint = Path(args.output_dir) / "checkpoint.pth"
        if checkpoint.exists():
            args.resume = str(checkpoint)
        return args


def make_executor(args: argparse.Namespace) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=args.job_dir / "submitit", cluster="slurm")
    params = {
        "name": args.job_name,
        "timeout_min": args.timeout,
        "nodes": args.nodes,
        "tasks_per_node": args.ntasks_per_node,
        "cpus_per_task": args.cpus_per_task,
        "slurm_signal_delay_s": args.signal_delay_s,
        "slurm_setup": [
            # The job may start anywhere: make the repo importable wherever sbatch runs the script.
            f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
            # As torchrun does: without it every task starts one thread per core of the node.
            f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{args.cpus_per_task}}}",
        ],
    }
    if args.ngpus:
        params["gpus_per_node"] = args.ngpus
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    for name in ("partition", "account", "qos", "comment", "constraint"):
        if getattr(args, name):
            params[f"slurm_{name}"] = getattr(args, name)
    executor.update_parameters(**params)
    return executor


def submit(args: argparse.Namespace) -> submitit.Job:
    """Submits `Trainer(args)`; raises SubmissionError with sbatch's message on refusal."""
    if shutil.which("sbatch") is None:
        raise SubmissionError("sbatch not found: submit.py needs a SLURM cluster (on one machine, use torchrun)")
    try:
        args.job_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SubmissionError(f"cannot create --job_dir {args.job_dir}: {err.strerror}") from None
    executor = make_executor(args)
    sbatch_stderr = io.StringIO()  # submitit prints sbatch's stderr before raising; keep it for one message
    try:
        with contextlib.redirect_stderr(sbatch_stderr):
            return executor.submit(Trainer(args))
    except submitit.core.utils.FailedJobError as err:
        message = str(err).strip() or sbatch_stderr.getvalue().strip() or "no message"
        message = "; ".join(line.removeprefix("sbatch: error: ").strip() for line in message.splitlines())
        raise SubmissionError(f"sbatch refused the job: {message}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        job = submit(args)
    except SubmissionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    where = f"partition {args.partition}" if args.partition else "the default partition"
    kind = f"{args.ngpus} GPUs" if args.ngpus else "CPU"
    print(f"Submitted job {job.job_id}: {args.nodes} node(s) x {args.ntasks_per_node} tasks ({kind}) on {where}, "
          f"{args.timeout} min")
    print(f"  logs:    {job.paths.stdout.parent}/{job.job_id}_<task>_log.out|err (task 0: {job.paths.stdout})")
    print(f"  outputs: {args.job_dir} (checkpoint.pth, log.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
