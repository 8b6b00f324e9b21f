"""Stopping a training run cleanly on SIGTERM / SIGINT (preemption, Ctrl-C, `kill`).

The step under way finishes, a checkpoint is saved and `Preempted` is raised: a
SystemExit with status 128 + the signal number (143 for SIGTERM, 130 for SIGINT), as if
the signal had ended the process, so that schedulers and shell scripts see an unfinished
job and restart it (exit 0 would tell a Kubernetes Job or a `train && export` chain it was
done). A second signal stops at once (the checkpoints already saved are kept). All the
processes of a multi-host run stop at the same step (see StopSignal).
"""
from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class Preempted(SystemExit):
  """Raised after the checkpoint that a SIGTERM/SIGINT asked for; exit status 128 + signum."""

  def __init__(self, signal_name: str, step: int):
    super().__init__(128 + int(signal.Signals[signal_name]))
    self.signal_name, self.step = signal_name, step


class StopSignal:
  """SIGTERM/SIGINT ask the loop to checkpoint and exit at the next step boundary.

  Every process of a multi-host run must stop at the same step. With a distributed client
  SIGTERM is left to JAX's preemption service (which catches it and agrees on a step) and
  SIGINT keeps its default (KeyboardInterrupt: the run resumes from its last regular
  checkpoint). Without one (several TPU hosts run without jax.distributed), each process
  catches the signals itself and the processes agree at every step on whether any got one.
  """

  def __init__(self):
    self.received: str | None = None
    self._previous = {}
    multihost = jax.process_count() > 1
    self._service = multihost and jax.distributed.is_initialized()
    self._agree = multihost and not self._service
    # Handlers can only be set from the main thread; elsewhere signals act by default.
    if not self._service and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):  # noqa: ARG002
    # Nothing printed here: a handler that writes to a stream the loop is writing to
    # raises "reentrant call".
    if self.received is not None:  # The second signal: stop now, the default way.
      self.restore()
      signal.raise_signal(signum)
      return
    self.received = signal.Signals(signum).name

  def should_stop(self, step: int) -> bool:
    if self._service:
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.received = "SIGTERM"
      except RuntimeError:  # The preemption service is off: signals act by default.
        pass
    elif self._agree:
      got = multihost_utils.process_allgather(np.int32(self.received is not None))
      if np.any(got) and self.received is None:
        self.received = "SIGTERM"  # Another process's: the schedulers' preemption signal.
    return self.received is not None

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    self._previous = {}
