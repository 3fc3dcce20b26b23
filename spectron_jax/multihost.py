"""A watchdog for the processes of one `jax.distributed` job.

A process that dies (kill -9, a lost host) leaves the others blocked in their next collective.
JAX's coordination service notices after its heartbeat timeout and aborts every process with a
C++ stack dump. The watchdog notices first and exits cleanly, naming what was lost:

- every process bumps its own counter in the coordination service's key-value store each
  `interval_s`;
- a thread reads the other processes' counters: one that has not moved for `timeout_s`, or a
  store that stops answering for that long (the coordinator, process 0, is gone), ends this
  process with `EXIT_LOST_PROCESS` and one log line naming the lost process and the last
  checkpoint to restart from;
- a process that finishes normally marks itself done, so its peers do not take it for lost.

The exit is `os._exit`: the main thread may be inside a collective that will never return.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

logger = logging.getLogger(__name__)

EXIT_LOST_PROCESS = 3
_PREFIX = "spectron/alive/"
_DONE = "done"


def _client() -> Any:
    from jax._src import distributed  # The store jax.distributed.initialize connected to.

    return distributed.global_state.client


class Watchdog:
    """Heartbeats of this process and a watch over the others' (see the module docstring).

    Args:
      timeout_s: how long a peer's counter may stand still before it counts as lost.
      interval_s: how often this process bumps its counter and reads the others'.
      describe: returns what to say about restarting (e.g. the last checkpoint), when lost.
      client: the key-value store (default: jax.distributed's); tests pass a fake.
      exit_fn: called with the exit code (default `os._exit`).
    """

    def __init__(
        self,
        timeout_s: float = 30.0,
        interval_s: float = 2.0,
        describe: Callable[[], str] = lambda: "",
        *,
        client: Any = None,
        process_index: int | None = None,
        process_count: int | None = None,
        exit_fn: Callable[[int], None] = os._exit,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not 0 < interval_s < timeout_s:
            raise ValueError(f"need 0 < interval_s < timeout_s, got {interval_s}, {timeout_s}")
        self.timeout_s, self.interval_s, self.describe = timeout_s, interval_s, describe
        self.client = client if client is not None else _client()
        self.index = jax.process_index() if process_index is None else process_index
        self.count = jax.process_count() if process_count is None else process_count
        self._exit, self._clock = exit_fn, clock
        self._beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        now = clock()
        self._seen: dict[int, tuple[str | None, float]] = {
            p: (None, now) for p in range(self.count) if p != self.index
        }
        self._store_ok_at = now

    def start(self) -> Watchdog:
        self.beat()
        self._thread = threading.Thread(target=self._loop, name="spectron-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Marks this process done (its peers stop watching it) and ends the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.client.key_value_set(f"{_PREFIX}{self.index}", _DONE, allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the store may be gone at the end of a job.
            pass

    def beat(self) -> None:
        self._beats += 1
        self.client.key_value_set(f"{_PREFIX}{self.index}", str(self._beats), allow_overwrite=True)

    def check(self) -> int | None:
        """One round: beat, read the peers; the lost process's index (-1: the store), or None."""
        now = self._clock()
        try:
            self.beat()
            values = {p: self._try_get(p) for p in self._seen}
        except Exception:  # noqa: BLE001 - any RPC failure: the coordinator may be gone.
            return -1 if now - self._store_ok_at > self.timeout_s else None
        self._store_ok_at = now
        for p, value in values.items():
            last, since = self._seen[p]
            if value == _DONE:
                continue
            if value != last:
                self._seen[p] = (value, now)
            elif now - since > self.timeout_s:
                return p
        return None

    def _try_get(self, p: int) -> str | None:
        try:
            return self.client.key_value_try_get(f"{_PREFIX}{p}")
        except Exception as err:  # noqa: BLE001
            if "NOT_FOUND" in str(err) or "not found" in str(err).lower():
                return None  # Not started yet: its clock runs from our start.
            raise

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            lost = self.check()
            if lost is not None:
                self._lost(lost)
                return

    def _lost(self, lost: int) -> None:
        what = (
            "the coordinator (process 0) stopped answering"
            if lost == -1
            else f"process {lost} of {self.count} stopped sending heartbeats"
        )
        message = (
            f"process {self.index}: {what} {self.timeout_s:.0f} s ago (killed or its host "
            f"lost); exiting. {self.describe()}"
        ).strip()
        logger.error("%s", message)
        print(message, file=sys.stderr, flush=True)
        self._exit(EXIT_LOST_PROCESS)
