"""The one training loop: steps, progress, interval-mean metrics, the NaN check, checkpoints and a clean stop.

Both trainers use it. A *driver* says how to take one step and where the state lives; the loop does everything else:
  - the next batches are prepared on a background thread (`Prefetch`) while the device runs the current step;
  - metrics are summed on the device; the host reads them only at log / checkpoint points (no sync in between);
  - at a log point it writes the mean over the interval for every unit (the same in both modes);
  - before any checkpoint it checks that the interval's losses are finite (`NonFiniteLossError` otherwise);
  - checkpoints every `train.ckpt_every` steps and every `train.ckpt_every_secs` seconds (0 = off);
  - before any save it checks that each unit's state (parameters, optimizer state, EMA) is finite: a step whose loss
    was finite but whose update was not is never saved (`NonFiniteLossError`, the last good step is kept);
  - SIGTERM / SIGINT: the current step finishes, every unit is saved, and `TrainingInterrupted` is raised (a rerun of
    the same command resumes). Several processes agree on the step through JAX's preemption sync point. Before the
    first step of a loop is done (restoring, compiling) there is nothing new to save, and the process stops at once,
    even from inside a long compile (a watcher thread woken through `signal.set_wakeup_fd`).
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils

from dblocks import checkpoint as ckpt_lib
from dblocks import logs, profiling, validation
from dblocks.steps import NonFiniteLossError

_allow_transfers = lambda: jax.transfer_guard_device_to_host("allow")  # noqa: E731  (deliberate reads)


class TrainingInterrupted(RuntimeError):
    """A stop signal arrived; every unit in training was saved at `step` (rerun the same command to resume)."""

    def __init__(self, message: str, step: int | None, signum: int):
        super().__init__(message)
        self.step, self.signum = step, signum


EXIT_INTERRUPTED = 4   # the entry points' status for a stop signal (experiments/common.py)
STOP_GRACE_SECONDS = 2.0   # how long a signal outside a step loop waits for the main thread before the process ends


class Driver(Protocol):
    """What the loop needs from a trainer: K units trained in lockstep (1 in sequential mode)."""
    units: list                      # dblocks.tasks.Unit, one per lockstep slot that is saved
    labels: list[str]
    ckpts: list                      # dblocks.checkpoint.UnitCheckpoint per unit
    devices: list                    # the jax devices the step runs on
    step_fn: Any                     # the compiled step (one per shape; dblocks.profiling caches its FLOPs)

    def batch(self, step: int) -> Any: ...              # the device batch of `step` (runs on the prefetch thread)
    def step(self, batch: Any) -> Any: ...              # one step; returns the metrics tree (on the device)
    def lower(self, batch: Any) -> Any: ...             # the step lowered for its arguments (FLOPs; dblocks.profiling)
    def eval_loss(self) -> Any: ...                     # {'val_loss'} per unit, on the device (dblocks.validation)
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
        self._busy = 0          # > 0 while a loop has stepped since its start (its progress is worth saving)
        self._wakeup: tuple[int, int, int] | None = None   # (read fd, write fd, the previous wakeup fd)
        self._stopped_by_signal = False   # a TrainingInterrupted left the `with`: the process is on its way out

    @classmethod
    def shared(cls) -> "StopSignal":
        """The installed StopSignal when there is one (a signal that arrived between units is not lost), else new."""
        return cls._active[-1] if cls._active else cls()

    def _handler(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if not self._busy:
            # Outside a stepping loop the handler only records the signal: it can run inside XLA's compiler (which
            # checks for signals while it holds the interpreter), where an exception stalls every thread until the
            # compile ends and then crashes the interpreter. The loop raises TrainingInterrupted at its start
            # (check_idle_stop), and the watcher thread ends the process if that does not come within the grace.
            return
        logs.log.warning("received %s: finishing the current step, then saving", signal.Signals(signum).name)

    def check_idle_stop(self) -> None:
        """Raises TrainingInterrupted when a stop signal arrived outside a stepping loop (restoring, compiling)."""
        if self.signum is not None and not self._busy:
            raise TrainingInterrupted(self._idle_message(self.signum), None, self.signum)

    @staticmethod
    def _idle_message(signum: int) -> str:
        return (f"stopped by {signal.Signals(signum).name} before training had stepped (while restoring or compiling): "
                f"nothing new to save; run the same command again to resume")

    def _watch(self, read_fd: int) -> None:
        """Woken by every signal (set_wakeup_fd), also while the main thread is inside a compile and cannot run the
        Python handler: a stop signal outside a stepping loop ends the process after a short grace period."""
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:   # __exit__ closed the write end
                os.close(read_fd)
                return
            stops = [s for s in data if s in (signal.SIGTERM, signal.SIGINT)]
            if stops and not self._busy:
                self._end_if_stuck(stops[0])

    def _end_if_stuck(self, signum: int) -> None:
        """Ends the process when, STOP_GRACE_SECONDS after an idle stop signal, this StopSignal is still installed
        (the main thread has not reached the loop's check: it is restoring, or inside a compile), or when the stop
        left this StopSignal as an exception and the main thread has finished while the interpreter waits for a
        thread (a compile still running) instead of exiting. A caller that caught the stop inside the `with` and
        went on is left alone."""
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline + 60 and not self._busy:
            time.sleep(0.1)
            installed = self._wakeup is not None
            ended = self._stopped_by_signal and not threading.main_thread().is_alive()
            if (installed and time.monotonic() >= deadline) or ended:
                if installed:   # the main thread never got to report it
                    print(f"error: {self._idle_message(signum)}", file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(EXIT_INTERRUPTED)

    @contextlib.contextmanager
    def stepping(self):
        """Marks a loop that has taken a step: from here a stop signal waits for the step to finish and a save. A
        signal that arrived during the loop's final save stops the process when the loop is done."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
        if self.signum is not None and not self._busy:
            raise TrainingInterrupted(f"stopped by {signal.Signals(self.signum).name} after the units in training "
                                      f"were saved complete; run the same command again to go on", None, self.signum)

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
            r, w = os.pipe()
            os.set_blocking(w, False)
            self._wakeup = (r, w, signal.set_wakeup_fd(w, warn_on_full_buffer=False))
            threading.Thread(target=self._watch, args=(r,), daemon=True, name="dblocks-stop-signal").start()
        return self

    def __exit__(self, exc_type, *exc):
        self._depth -= 1
        if self._depth:
            return False
        self._stopped_by_signal = exc_type is not None and issubclass(exc_type, TrainingInterrupted)
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
        if self._wakeup is not None:
            r, w, previous = self._wakeup
            self._wakeup = None
            signal.set_wakeup_fd(previous)
            os.close(w)   # the watcher reads end-of-file, closes its end and returns
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


# -- the loop ----------------------------------------------------------------------------------------------------------

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
    window = profiling.ProfileWindow(config, writer.workdir, "+".join(driver.labels))   # train.profile_steps
    sums, count, t0, last_save = None, 0, time.time(), time.monotonic()
    eval_every, last_eval = validation.eval_every(config), start   # held-out loss at log points (train.eval_every)
    prefetch = Prefetch(driver.batch, range(start, total))
    with StopSignal.shared() as stop, contextlib.ExitStack() as stepping:
        try:
            stop.check_idle_stop()   # a signal while the units restored
            for step in range(start, total):
                if on_step is not None:
                    for u in driver.units:
                        on_step(u, step)
                window.before(step)
                batch = next(prefetch)
                metrics = driver.step(batch)
                done = step + 1
                window.after(done, metrics)
                if step == start:   # compiled and dispatched: from here a stop signal saves this progress
                    stepping.enter_context(stop.stepping())
                    cost = profiling.step_cost(driver, batch, config)   # FLOPs per step, off the clock
                    for p in progress:
                        p.flops_per_step, p.peak_flops = cost
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
                    val = None
                    if at_log and validation.due(done, last_eval, eval_every):
                        val, last_eval = driver.eval_loss(), done   # dispatched; fetched with the metrics below
                    with _allow_transfers():
                        host, val = driver.to_host((sums, val))
                        _check_finite(driver, host, count, done)
                        if at_log:
                            _log(driver, progress, writer, host, count, done, t0, batch_size, lr_at, val)
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
            window.close()
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


def _log(driver, progress, writer, host, count, done, t0, batch_size, lr_at, val=None) -> None:
    for i, label in enumerate(driver.labels):
        held_out = {} if val is None else driver.unit_metrics(val, i)   # val_loss, beside the interval means
        record = progress[i].update(done, {**_mean(driver.unit_metrics(host, i), count), **held_out})
        if record is None:
            continue
        extra = {"examples_per_s": record["steps_per_s"] * batch_size}
        if lr_at is not None:
            extra["lr"] = float(lr_at(done))
        writer.write({"unit": label, "step": done, "wall": time.time() - t0, **record, **extra})


def _save(driver: Driver, step: int, force: bool) -> None:
    """Saves every unit at `step`, each only if its whole state is finite (a NaN in the parameters or optimizer
    state can follow from a step whose loss was finite; such a checkpoint could never be resumed)."""
    with _allow_transfers():
        for i, ck in enumerate(driver.ckpts):
            state = driver.unit_state(i)
            if not bool(ckpt_lib.all_finite(state)):
                last = ck.latest_step()
                raise NonFiniteLossError(
                    f"[{driver.labels[i]}] the parameters or optimizer state hold NaN/inf at step {step} (the loss "
                    f"was still finite); nothing from that step is saved; the last good checkpoint is "
                    f"{'step %d' % last if last is not None else 'none yet'}. Lower optim.lr, keep "
                    f"optim.grad_clip > 0, or check the data.")
            ck.save(step, state, force=force)


def _wait(driver: Driver) -> None:
    for ck in driver.ckpts:
        with contextlib.suppress(AttributeError):
            ck.manager.wait_until_finished()   # on disk before the meta says so
