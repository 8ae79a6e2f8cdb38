"""Graceful stop on SIGTERM / SIGUSR1 / SIGUSR2 (what SLURM sends before preemption or the time limit).

The handler only records the signal; the engine checks `requested` at step boundaries, writes a checkpoint,
then calls `finish()`: a handler installed before ours (submitit's requeue on USR2) runs next, otherwise the
process exits with code 0.
"""

from __future__ import annotations

import signal
import sys


class PreemptionHandler:
    """Records stop signals so training can checkpoint at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

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
        sys.exit(0)
