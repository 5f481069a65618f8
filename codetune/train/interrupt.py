"""Ctrl-C / SIGTERM during training: the first signal asks the loop to checkpoint at the next step
boundary and stop (printing how to resume); a second one aborts at once. The handlers are installed for
the loop only and the previous ones put back afterwards."""

from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """Raised after the stop checkpoint is written; the CLI turns it into exit code 128 + signal."""

    def __init__(self, step: int, signum: int, checkpoint):
        self.step, self.signum, self.checkpoint = step, signum, checkpoint
        super().__init__(f"stopped at step {step} ({signal.Signals(signum).name})")


class StopRequest:
    """Context manager; `.signum` is set once a stop was asked for."""

    def __init__(self, enabled: bool = True):
        # signal.signal works only in the main thread; elsewhere (a library caller's worker thread) the
        # default behaviour stays
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        if self.enabled:
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # the second signal: abort now, the last checkpoint is what remains
        self.signum = signum
        print(f"\ncodetune train: {signal.Signals(signum).name} received: finishing this step, then a checkpoint "
              "and stop (press Ctrl-C again to abort at once)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None
