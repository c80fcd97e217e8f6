"""The errors a training run ends with, and the exit status each gives (:meth:`fastmae.trainer.Trainer.run`)."""

from __future__ import annotations

import signal
import sys
from typing import Any

from .config import ConfigError

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_PREEMPTED = 0, 1, 2, 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class AgreedError(RuntimeError):
    """An error every rank raises at the same point with the same message (so no rank has to be stopped)."""


class NonFiniteLossError(AgreedError):
    """The loss became NaN or inf on some rank (train.on_nonfinite=stop)."""


class ResumeError(AgreedError):
    """The checkpoint to resume from is unusable here, or resuming would silently change the schedule."""


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was saved at the step boundary that followed."""


# user-facing errors are printed as one line; anything else with its traceback
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ConfigError, AgreedError, FileNotFoundError, ImportError)


def expected(err: BaseException) -> bool:
    """Whether ``err`` is a user-facing error (printed as one line, without a traceback)."""
    from .data import ShardError  # the data package imports torch's loaders: only when an error is reported

    return isinstance(err, (*EXPECTED_ERRORS, ShardError))


class StopSignals:
    """SIGTERM / SIGUSR1 (a scheduler's preemption): noted, so that the loop saves a checkpoint at the next step
    boundary on every rank together and the run exits with ``EXIT_PREEMPTED``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.rank = 0
        self._saved: dict[int, Any] = {}

    @property
    def received(self) -> bool:
        return self.signum is not None

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            print(f"[fastmae] rank {self.rank}: {signal.Signals(signum).name}: saving a checkpoint at the next "
                  f"step boundary, then exiting with status {EXIT_PREEMPTED}", file=sys.stderr, flush=True)

    def install(self, rank: int) -> None:
        self.rank = rank
        self._saved = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def restore(self) -> None:
        for s, h in self._saved.items():
            try:
                signal.signal(s, h)
            except (ValueError, TypeError):
                pass
        self._saved = {}
