"""SIGTERM / SIGUSR1 (SLURM preemption, `scancel --signal`): finish the current step, checkpoint, exit 0.

The handler only sets a flag; the trainer reads it between steps and all ranks agree (a MAX all-reduce) so that
every rank saves the same step even when the signal reached only some of them.
"""

from __future__ import annotations

import signal
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
