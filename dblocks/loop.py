"""The one training loop: steps, progress, interval-mean metrics, the NaN check, checkpoints and a clean stop.

Both trainers use it. A *driver* says how to take one step and where the state lives; the loop does everything else:
  - the next batches are prepared on a background thread (`Prefetch`) while the device runs the current step;
  - metrics are summed on the device; the host reads them only at log / checkpoint points (no sync in between);
  - at a log point it writes the mean over the interval for every unit (the same in both modes);
  - before any checkpoint it checks that the interval's losses are finite (`NonFiniteLossError` otherwise);
  - checkpoints every `train.ckpt_every` steps and every `train.ckpt_every_secs` seconds (0 = off);
  - SIGTERM / SIGINT: the current step finishes, every unit is saved, and `TrainingInterrupted` is raised (a rerun of
    the same command resumes). Several processes agree on the step through JAX's preemption sync point.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import signal
import threading
import time
from typing import Any, Callable, Iterable, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils

from dblocks import logs
from dblocks.steps import NonFiniteLossError

_allow_transfers = lambda: jax.transfer_guard_device_to_host("allow")  # noqa: E731  (deliberate reads)


class TrainingInterrupted(RuntimeError):
    """A stop signal arrived; every unit in training was saved at `step` (rerun the same command to resume)."""

    def __init__(self, message: str, step: int, signum: int):
        super().__init__(message)
        self.step, self.signum = step, signum


class Driver(Protocol):
    """What the loop needs from a trainer: K units trained in lockstep (1 in sequential mode)."""
    units: list                      # dblocks.tasks.Unit, one per lockstep slot that is saved
    labels: list[str]
    ckpts: list                      # dblocks.checkpoint.UnitCheckpoint per unit

    def batch(self, step: int) -> Any: ...              # the device batch of `step` (runs on the prefetch thread)
    def step(self, batch: Any) -> Any: ...              # one step; returns the metrics tree (on the device)
    def to_host(self, tree: Any) -> Any: ...
    def unit_metrics(self, host: Any, i: int) -> dict: ...   # unit i's metrics from a host tree
    def unit_state(self, i: int) -> Any: ...            # unit i's state, as its checkpoint stores it


# -- stop signals ---------------------------------------------------------------------------------------------------

class StopSignal:
    """Records SIGTERM / SIGINT instead of dying, while installed (main thread only; elsewhere a no-op).
    A second SIGINT restores the default handler's behaviour (KeyboardInterrupt) for an impatient user."""

    _active: list["StopSignal"] = []   # the installed one, shared by nested users (train() around every loop)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}
        self._depth = 0

    @classmethod
    def shared(cls) -> "StopSignal":
        """The installed StopSignal when there is one (a signal that arrived between units is not lost), else new."""
        return cls._active[-1] if cls._active else cls()

    def _handler(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logs.log.warning("received %s: finishing the current step, then saving", signal.Signals(signum).name)

    def __enter__(self):
        self._depth += 1
        if self._depth > 1:   # already installed by an enclosing user
            return self
        self._active.append(self)
        # Several processes: JAX's preemption notifier (installed by jax.distributed.initialize) owns SIGTERM and
        # makes every process stop at the same step; a local handler would hide the signal from it.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth:
            return False
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
        self._active.remove(self)
        return False

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:  # all processes stop at the same step (jax's preemption notifier sees SIGTERM)
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # no preemption sync manager: SIGTERM ends the processes as usual
                return False
        return self.signum is not None


# -- prefetch ---------------------------------------------------------------------------------------------------------

class Prefetch:
    """Yields fn(step) for steps in order, computing up to `depth` of them ahead on one background thread."""

    def __init__(self, fn: Callable[[int], Any], steps: Iterable[int], depth: int = 2):
        self._fn, self._steps, self._depth = fn, iter(steps), depth
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dblocks-prefetch")
        self._queue: collections.deque = collections.deque()
        for _ in range(depth):
            self._submit()

    def _submit(self) -> None:
        step = next(self._steps, None)
        if step is not None:
            self._queue.append(self._pool.submit(self._fn, step))

    def __next__(self) -> Any:
        out = self._queue.popleft().result()
        self._submit()
        return out

    def close(self) -> None:
        for f in self._queue:
            f.cancel()
        self._pool.shutdown(wait=True)


# -- the loop -----------------------------------------------------------------------------------------------------------

def _mean(host: dict, count: int) -> dict:
    return {k: np.asarray(v) / count for k, v in host.items()}


@jax.jit
def _accumulate(sums, metrics):
    return jax.tree.map(lambda a, b: a + b, sums, metrics)


def run(driver: Driver, start: int, total: int, config, writer: logs.MetricsWriter,
        lr_at: Callable[[int], float] | None = None, on_step: Callable[[Any, int], None] | None = None) -> None:
    """Trains the driver's units from `start` to `total` steps and saves them complete; see the module docstring."""
    t = config.train
    log_every, ckpt_every = int(t.log_every), int(t.ckpt_every)
    every_secs = float(t.ckpt_every_secs or 0)
    batch_size = int(config.data.batch_size)
    multi = jax.process_count() > 1
    progress = [logs.Progress(label, start, total, log_every) for label in driver.labels]
    sums, count, t0, last_save = None, 0, time.time(), time.monotonic()
    prefetch = Prefetch(driver.batch, range(start, total))
    try:
        with StopSignal.shared() as stop:
            for step in range(start, total):
                if on_step is not None:
                    for u in driver.units:
                        on_step(u, step)
                metrics = driver.step(next(prefetch))
                done = step + 1
                if step == start:
                    for p in progress:
                        p.start_clock(done)
                sums = metrics if sums is None else _accumulate(sums, metrics)   # on the device, no sync
                count += 1
                at_log = done % log_every == 0 or done == total
                timed = every_secs > 0 and (at_log or not multi) and time.monotonic() - last_save >= every_secs
                if timed and multi:   # every process must take the same decision
                    timed = bool(multihost_utils.broadcast_one_to_all(np.int32(timed)))
                interrupted = stop.requested(done)
                save = (done % ckpt_every == 0 or timed or interrupted) and done != total
                if at_log or save:   # the only place the host reads the device between steps
                    with _allow_transfers():
                        host = driver.to_host(sums)
                        _check_finite(driver, host, count, done)
                        if at_log:
                            _log(driver, progress, writer, host, count, done, t0, batch_size, lr_at)
                    if at_log:
                        sums, count = None, 0
                if save:
                    _save(driver, done, force=True)
                    last_save = time.monotonic()
                if interrupted and done != total:
                    _wait(driver)
                    for ck in driver.ckpts:
                        ck.write_meta(complete=False, step=done)
                    name = signal.Signals(stop.signum).name if stop.signum else "a preemption notice"
                    raise TrainingInterrupted(
                        f"stopped by {name} at step {done} of {total} ({', '.join(driver.labels)}): the checkpoint "
                        f"is saved; run the same command again to resume", done, stop.signum or signal.SIGTERM)
    finally:
        prefetch.close()
    _save(driver, total, force=True)
    _wait(driver)
    for ck in driver.ckpts:
        ck.write_meta(complete=True, step=total)


def _check_finite(driver: Driver, host, count: int, done: int) -> None:
    for i, label in enumerate(driver.labels):
        loss = float(np.asarray(driver.unit_metrics(host, i)["loss"]) / count)
        if not np.isfinite(loss):
            last = driver.ckpts[i].latest_step()
            raise NonFiniteLossError(
                f"[{label}] loss is {loss} in the steps up to {done}; nothing from them is saved; the last good "
                f"checkpoint is {'step %d' % last if last is not None else 'none yet'}. Lower optim.lr, keep "
                f"optim.grad_clip > 0, or check the data.")


def _log(driver, progress, writer, host, count, done, t0, batch_size, lr_at) -> None:
    for i, label in enumerate(driver.labels):
        record = progress[i].update(done, _mean(driver.unit_metrics(host, i), count))
        if record is None:
            continue
        extra = {"examples_per_s": record["steps_per_s"] * batch_size}
        if lr_at is not None:
            extra["lr"] = float(lr_at(done))
        writer.write({"unit": label, "step": done, "wall": time.time() - t0, **record, **extra})


def _save(driver: Driver, step: int, force: bool) -> None:
    with _allow_transfers():
        for i, ck in enumerate(driver.ckpts):
            ck.save(step, driver.unit_state(i), force=force)


def _wait(driver: Driver) -> None:
    for ck in driver.ckpts:
        with contextlib.suppress(AttributeError):
            ck.manager.wait_until_finished()   # on disk before the meta says so
