"""Graceful stop on SIGTERM / SIGUSR1 / SIGUSR2 (what SLURM sends before preemption or the time limit) and on
SIGINT (Ctrl-C).

The handler only records the signal; the engine checks `requested` at step boundaries, writes a checkpoint,
then calls `finish()`: a handler installed before ours (submitit's requeue on USR2) runs next, otherwise the
process exits with code 0 (130 after Ctrl-C, the shell's code for it). A second Ctrl-C does not wait for the
step boundary: it raises KeyboardInterrupt.

SLURM (at the time limit, on `scancel`), `timeout`, container runtimes and a terminal send the signal to every
process of the job, data-loader workers included; workers therefore ignore these signals (`ignore_stop_signals`)
and leave the stop to the main process, instead of dying and taking the run down before it can checkpoint.
"""

from __future__ import annotations

import signal
import sys


class PreemptionHandler:
    """Records stop signals so training can checkpoint at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionHandler:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._record)
            except ValueError:  # not the main thread (e.g. some launchers): no graceful stop there
                pass
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            try:
                signal.signal(sig, prev)
            except (ValueError, TypeError):
                pass
        self._previous.clear()

    def _record(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        self.requested = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.requested).name if self.requested else ""

    def finish(self) -> None:
        """After the checkpoint is written: defer to a previous handler (e.g. submitit's requeue) or exit 0."""
        sig = self.requested
        prev = self._previous.get(sig)
        self.uninstall()
        if callable(prev) and prev not in (signal.default_int_handler,):
            prev(sig, None)
        sys.exit(130 if sig == signal.SIGINT else 0)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: the worker ignores the stop signals, which the main process handles.

    PyTorch's workers otherwise die on SIGTERM (and on SIGUSR1/2 by default), and the main process then fails with
    "DataLoader worker is killed by signal" at its next batch. A worker still exits when the main process ends.
    """
    for sig in PreemptionHandler.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
