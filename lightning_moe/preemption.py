"""Preemption: a signal (SIGTERM, SIGUSR1, ...) makes every rank finish its step, save there, and exit 75.

Why not Lightning's own SIGTERM handling: its handler runs a ``dist.broadcast`` inside the signal handler
(a collective that the other ranks do not match at that moment) and each rank then stops at the end of
whichever batch it is in, so ranks that got the signal at different times stop at different steps, and
the checkpoint a ``OnExceptionCheckpoint`` would write is collective. Here the handler only sets a flag;
after every optimizer step the ranks agree on it with one all-reduce (``reduce_boolean_decision``), so a
signal that reached any one rank (SLURM signals every task; a launcher's parent may be the only one)
stops all of them after the same step. The checkpoint callback then saves ``step-<N>.ckpt`` at that
step, exactly where a periodic checkpoint would be written, and raises :class:`Preempted`.

:class:`Preempted` is a ``SystemExit`` with code :data:`PREEMPTED_EXIT_CODE` (75, ``EX_TEMPFAIL``: "try
again later"), so a job script can requeue on it; running the same command again resumes from that
checkpoint and ends with the parameters of an uninterrupted run. Under SLURM with
``checkpoint.slurm_requeue=true``, rank 0 also asks ``scontrol requeue $SLURM_JOB_ID``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Sequence
from types import FrameType
from typing import Any

from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["PREEMPTED_EXIT_CODE", "Preempted", "PreemptionSignals", "parse_signal", "request_slurm_requeue"]

log = logging.getLogger(__name__)

#: Exit code of a preempted run that saved its checkpoint (``EX_TEMPFAIL``: re-run the same command).
PREEMPTED_EXIT_CODE = 75


class Preempted(SIGTERMException):
    """Training stopped on a signal after saving a checkpoint; exits the process with code 75."""

    def __init__(self, message: str) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


def parse_signal(name: str | int) -> signal.Signals:
    """``"SIGTERM"``, ``"TERM"``, ``"usr1"`` or a number as a :class:`signal.Signals`.

    Raises:
        ValueError: not a signal this platform has, or one that cannot be caught (SIGKILL, SIGSTOP).
    """
    try:
        if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
            sig = signal.Signals(int(name))
        else:
            text = str(name).upper()
            sig = signal.Signals[text if text.startswith("SIG") else "SIG" + text]
    except (KeyError, ValueError):
        raise ValueError(f"{name!r} is not a signal name; use e.g. SIGTERM or SIGUSR1") from None
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"{sig.name} cannot be caught; use e.g. SIGTERM or SIGUSR1")
    return sig


class PreemptionSignals:
    """Handlers for ``signals`` that only record which one arrived (safe at any point of a step)."""

    def __init__(self, signals: Sequence[str | int]) -> None:
        self.signals = [parse_signal(s) for s in signals]
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            log.warning("received %s: stopping after this step with a checkpoint", self.received.name)

    def install(self) -> None:
        """Replace the handlers of the signals (Lightning's included); the old ones come back on :meth:`restore`."""
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}


def request_slurm_requeue() -> bool:
    """Ask SLURM to requeue this job (``scontrol requeue <job id>``); False outside SLURM or on failure."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID")
    if not job or not job.replace("_", "").isdigit():
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("could not requeue SLURM job %s: %s", job, err)
        return False
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip()[:200])
        return False
    log.warning("requeued SLURM job %s", job)
    return True
