"""Distributed setup: one process per device, started by torchrun, by SLURM (srun / submitit) or by hand.

`read_dist_env(environ)` turns whichever launcher environment exists into a `DistEnv` (no process group,
testable with a dict); `init_distributed_mode(args)` applies it (gloo on CPU, NCCL on CUDA, with
`--dist_timeout`): a rendezvous that cannot complete in that time is a one-line DistributedSetupError naming
the address, not a hang or a C++ traceback. The collective helpers (`reduce_dict`, `all_gather_object`, ...)
follow DETR's util/misc.py but are also correct in a single process and on CPU, where DETR assumed CUDA.

Environments, in order of precedence:
- torchrun: RANK, WORLD_SIZE, LOCAL_RANK (+ MASTER_ADDR, MASTER_PORT). All three or none.
- SLURM task (inside `srun`, i.e. SLURM_STEP_ID is set): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; rank 0's
  host is the first host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST (expanded by `scontrol show hostnames`,
  see `job_hostnames`); port 20000 + job id % 20000 unless MASTER_ADDR / MASTER_PORT are set. SLURM_NTASKS=1
  is a single process.
- SLURM batch script (SLURM_PROCID=0 but no SLURM_STEP_ID): a single process, unless the job has several
  tasks, which is an error (the tasks must be started with srun).
- Anything else, including an interactive `salloc` shell (SLURM_JOB_ID without SLURM_PROCID): single process.
"""

from __future__ import annotations

import builtins
import datetime
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_builtin_print = builtins.print


class DistributedSetupError(RuntimeError):
    """The launcher environment or device request cannot be turned into a process setup (one-line message)."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as read from the launcher's environment."""

    launcher: str  # "torchrun", "slurm" or "single"
    rank: int = 0  # global rank of this process
    world_size: int = 1  # number of processes in the job
    local_rank: int = 0  # rank on this node; picks the GPU
    master_addr: str | None = None  # host of rank 0 (rendezvous)
    master_port: int | None = None  # rendezvous TCP port
    restart_count: int = 0  # SLURM_RESTART_COUNT: > 0 when SLURM requeued the job (preemption, time limit)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# ---------------------------------------------------------------------------------------------------------------
# Reading the environment


def _int_var(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise DistributedSetupError(f"{name}={environ[name]!r} is not an integer") from None


def _check_ranks(launcher: str, rank: int, world_size: int, local_rank: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise DistributedSetupError(
            f"inconsistent {launcher} environment: rank {rank}, world size {world_size}, local rank {local_rank}"
        )


def slurm_master_port(job_id: str | int) -> int:
    """A rendezvous port in [20000, 40000) derived from the SLURM job id, so every task of a job agrees on it."""
    match = re.match(r"\d+", str(job_id))
    if match is None:
        raise DistributedSetupError(f"SLURM job id {job_id!r} is not numeric; set MASTER_PORT")
    return 20000 + int(match.group()) % 20000


def job_hostnames(nodelist: str) -> list[str]:
    """The hosts of a SLURM node list such as `node[1-3,5],gpu07`, in SLURM's order.

    Asks `scontrol show hostnames`; where scontrol is missing or fails (e.g. no readable slurm.conf), submitit's
    SLURM job environment (`SlurmJobEnvironment().hostnames`) expands the job's own SLURM_JOB_NODELIST. Raises
    DistributedSetupError when neither can."""
    problem = "scontrol not found"
    if shutil.which("scontrol"):
        try:
            # Short timeout: without a readable slurm.conf, scontrol may retry for a minute before failing.
            proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                  timeout=10)
            hosts = proc.stdout.split()
            if proc.returncode == 0 and hosts:
                return hosts
            problem = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        except subprocess.TimeoutExpired:
            problem = "scontrol show hostnames timed out"
        except OSError as e:
            problem = f"scontrol: {e.strerror or e}"
    if nodelist and os.environ.get("SLURM_JOB_NODELIST") == nodelist:
        from submitit.slurm.slurm import SlurmJobEnvironment  # a launcher dependency, only needed here

        try:
            hosts = list(SlurmJobEnvironment().hostnames)  # expands os.environ's SLURM_JOB_NODELIST
            if hosts:
                return hosts
        except Exception as e:  # submitit's parser raises its own exception type on an unknown format
            problem += f"; submitit: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    raise DistributedSetupError(f"cannot expand the SLURM node list {nodelist!r} ({problem}); set MASTER_ADDR")


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list (where SLURM starts rank 0): see `job_hostnames`."""
    return job_hostnames(nodelist)[0]


def read_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Reads torchrun, SLURM or no launcher variables (see the module docstring); raises DistributedSetupError
    for a partial or inconsistent environment instead of hanging in the rendezvous."""
    env = os.environ if environ is None else environ
    restarts = _int_var(env, "SLURM_RESTART_COUNT") if "SLURM_RESTART_COUNT" in env else 0

    present = [name for name in _TORCHRUN_VARS if name in env]
    if present:
        missing = [name for name in _TORCHRUN_VARS if name not in env]
        if missing:
            raise DistributedSetupError(
                f"incomplete torchrun environment: {', '.join(present)} set but {', '.join(missing)} missing"
            )
        rank, world_size, local_rank = (_int_var(env, name) for name in _TORCHRUN_VARS)
        _check_ranks("torchrun", rank, world_size, local_rank)
        master_port = _int_var(env, "MASTER_PORT") if env.get("MASTER_PORT") else None
        return DistEnv("torchrun", rank, world_size, local_rank, env.get("MASTER_ADDR") or None, master_port,
                       restarts)

    if "SLURM_PROCID" not in env:  # no launcher, or an interactive salloc shell
        return DistEnv("single")

    in_step = "SLURM_STEP_ID" in env  # set by srun for every task; absent in the sbatch script itself
    if "SLURM_NTASKS" not in env:
        if in_step:
            raise DistributedSetupError(
                "incomplete SLURM environment: SLURM_PROCID is set but SLURM_NTASKS is missing "
                "(start the tasks with srun --ntasks N)"
            )
        return DistEnv("slurm", restart_count=restarts)  # a plain sbatch script: one process
    ntasks = _int_var(env, "SLURM_NTASKS")
    if not in_step:
        if ntasks > 1:
            raise DistributedSetupError(
                f"this is the batch script of a {ntasks}-task SLURM job: start the tasks with `srun python main.py ...`"
            )
        return DistEnv("slurm", restart_count=restarts)
    if ntasks == 1:
        return DistEnv("slurm", restart_count=restarts)

    if "SLURM_LOCALID" not in env:
        raise DistributedSetupError("incomplete SLURM environment: SLURM_PROCID is set but SLURM_LOCALID is missing")
    rank, local_rank = _int_var(env, "SLURM_PROCID"), _int_var(env, "SLURM_LOCALID")
    _check_ranks("SLURM", rank, ntasks, local_rank)
    master_addr = env.get("MASTER_ADDR")
    if not master_addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise DistributedSetupError("incomplete SLURM environment: no SLURM_JOB_NODELIST and no MASTER_ADDR")
        master_addr = first_host(nodelist)
    if env.get("MASTER_PORT"):
        master_port = _int_var(env, "MASTER_PORT")
    else:
        if "SLURM_JOB_ID" not in env:
            raise DistributedSetupError("incomplete SLURM environment: no SLURM_JOB_ID and no MASTER_PORT")
        master_port = slurm_master_port(env["SLURM_JOB_ID"])
    return DistEnv("slurm", rank, ntasks, local_rank, master_addr, master_port, restarts)


# ---------------------------------------------------------------------------------------------------------------
# Initialisation


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'cpu', 'cuda' (error if unavailable) or 'auto' (CUDA if available) -> this process's device.

    With several visible GPUs the process takes `cuda:{local_rank % count}`, which covers both SLURM's
    `--gpus-per-node` (every task sees all GPUs) and `--gpus-per-task=1` (each task sees one)."""
    if name not in ("auto", "cpu", "cuda"):
        raise DistributedSetupError(f"unknown device {name!r}: expected auto, cpu or cuda")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        raise DistributedSetupError(
            f"--device cuda requested but CUDA is not available (torch {torch.__version__}, "
            f"CUDA_VISIBLE_DEVICES={visible}); use --device cpu or auto"
        )
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def check_dist_url(url: str) -> str:
    """Returns `url` if every process can use it: a `file://` rendezvous must be an absolute path (DETR issue:
    a relative --job_dir gave a relative file:// URL that each node resolved differently)."""
    if url.startswith("file://") and not os.path.isabs(url[len("file://"):]):
        raise DistributedSetupError(f"--dist_url {url} is relative; every process must see the same absolute path")
    return url


def _wait_for_master(host: str, port: int, timeout: float, who: str) -> None:
    """Returns once a TCP connection to host:port opens, i.e. rank 0's rendezvous store listens there; raises
    DistributedSetupError naming the address after `timeout` seconds of refused, unreachable or unresolvable
    attempts. (torch's own connect loop can overrun its timeout by a retry back-off and logs C++ tracebacks.)
    `who` ("rank 1 on node2") starts the message."""
    deadline = time.monotonic() + timeout
    problem = "no attempt"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DistributedSetupError(
                f"{who}: cannot reach the rendezvous at {host}:{port} (MASTER_ADDR:MASTER_PORT, rank 0's host) "
                f"within --dist_timeout {timeout:g} s: {problem}")
        try:
            with socket.create_connection((host, port), timeout=min(5.0, remaining)):
                return
        except TimeoutError:  # keeps a more telling earlier error ("No route to host")
            problem = problem if problem != "no attempt" else "timed out"
        except OSError as e:  # refused (rank 0 not listening yet), unreachable, unresolvable
            problem = e.strerror or str(e) or type(e).__name__
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def init_distributed_mode(args: Any) -> torch.device:
    """Reads the launcher environment, sets `args.rank`, `args.world_size`, `args.local_rank`, `args.gpu`,
    `args.distributed` (and `args.dist_backend`), joins the process group when there are several processes
    and returns this process's device. Non-zero ranks print only with `print(..., force=True)` afterwards.

    Uses `args.device` ('auto' | 'cpu' | 'cuda'), `args.dist_url` ('env://' rendezvous at MASTER_ADDR:PORT,
    or e.g. 'tcp://host:port' / 'file:///abs/path') and `args.dist_timeout` (seconds). Every rank prints one
    line naming its host. A rendezvous that does not complete within the timeout (MASTER_ADDR unreachable or
    wrong, rank 0 missing, a peer unreachable) raises DistributedSetupError naming the address."""
    env = read_dist_env()
    args.rank, args.world_size, args.local_rank = env.rank, env.world_size, env.local_rank
    args.gpu = env.local_rank
    args.distributed = env.distributed
    device = resolve_device(getattr(args, "device", "auto"), env.local_rank)
    args.dist_backend = "nccl" if device.type == "cuda" else "gloo"
    if not env.distributed:
        return device

    url = check_dist_url(getattr(args, "dist_url", "env://") or "env://")
    if url == "env://":
        if env.master_addr is None or env.master_port is None:
            raise DistributedSetupError(
                f"{env.launcher} environment with {env.world_size} processes but MASTER_ADDR/MASTER_PORT unset"
            )
        # An IPv6 literal needs brackets in a URL.
        host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr
        url = f"tcp://{host}:{env.master_port}"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout_s = getattr(args, "dist_timeout", 1800)
    requeued = f", SLURM restart {env.restart_count}" if env.restart_count else ""
    _builtin_print(f"| distributed init: rank {env.rank}/{env.world_size} (local {env.local_rank}, "
                   f"{args.dist_backend}, {env.launcher}{requeued}) on {socket.gethostname()} at {url}", flush=True)
    who, where = f"rank {env.rank} on {socket.gethostname()}", url.removeprefix("tcp://")
    if url.startswith("tcp://") and env.rank > 0:
        parts = urlsplit(url)
        if parts.hostname and parts.port:
            _wait_for_master(parts.hostname, parts.port, timeout_s, who)
    started = time.monotonic()
    try:
        dist.init_process_group(args.dist_backend, init_method=url, world_size=env.world_size, rank=env.rank,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, OSError, ValueError) as e:  # DistNetworkError / DistStoreError are RuntimeErrors
        # torch's connect loop may add a retry back-off to the timeout: say how long it took.
        raise DistributedSetupError(
            f"{who}: the rendezvous at {where} failed after {time.monotonic() - started:.0f} s (--dist_timeout "
            f"{timeout_s} s): {_first_line(e)}") from None
    try:
        barrier()  # every rank is here and connected to every other one
    except RuntimeError as e:
        dist.destroy_process_group()
        raise DistributedSetupError(
            f"{who}: joined the rendezvous at {where} but could not exchange data with every other process within "
            f"--dist_timeout {timeout_s} s: {_first_line(e)}") from None
    setup_for_distributed(env.rank == 0)
    return device


def setup_for_distributed(is_master: bool) -> None:
    """Silences `print` on non-master processes; `print(..., force=True)` still prints everywhere."""

    def print(*args: Any, force: bool = False, **kwargs: Any) -> None:
        if is_master or force:
            _builtin_print(*args, **kwargs)

    builtins.print = print


def cleanup() -> None:
    """Leaves the process group (if any) and restores the builtin `print`."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()
    builtins.print = _builtin_print


# ---------------------------------------------------------------------------------------------------------------
# Helpers (no-ops in a single process)


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if not is_dist_avail_and_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all processes (a new tensor; the input is untouched). Tensors must live on this
    process's device (CUDA for NCCL, CPU for gloo)."""
    if get_world_size() == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def mean_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over all processes (`tensor` itself with one process)."""
    world_size = get_world_size()
    return tensor if world_size == 1 else all_reduce_sum(tensor) / world_size


def reduce_dict(input_dict: dict[str, torch.Tensor], average: bool = True) -> dict[str, torch.Tensor]:
    """DETR's reduce_dict: {name: scalar tensor} summed (or averaged) over all processes, same keys."""
    world_size = get_world_size()
    if world_size == 1:
        return input_dict
    with torch.no_grad():
        names = sorted(input_dict)  # the same order on every rank
        values = torch.stack([input_dict[name] for name in names])
        dist.all_reduce(values)
        if average:
            values /= world_size
        return dict(zip(names, values))


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] for any picklable object (e.g. per-rank predictions)."""
    world_size = get_world_size()
    if world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered
