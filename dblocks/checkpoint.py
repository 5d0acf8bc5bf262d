"""Per-unit Orbax checkpoints and their meta (docs/design.md item 10), and what keeps them safe.

WORKDIR/blocks/block_XX/ (or WORKDIR/e2e/) holds an Orbax CheckpointManager with the unit's train state
(step, params, opt_state, ema) and `meta.json`: the block id, its noise ranges, the partition and a hash of the config
fields that must agree across blocks. Orbax writes each checkpoint to a temporary directory and renames it when
complete, and `meta.json` is replaced atomically, so a killed run never leaves a half-written checkpoint behind.

What can still go wrong on disk, and what happens (docs/reliability.md):
- a step that cannot be read, or whose content does not match the expected tree (shapes, dtypes, its own step
  counter, finite values): `restore` warns, moves it aside into `<unit dir>/quarantine/<step>` (never deletes it)
  and falls back to the newest good step. No good step left: `CheckpointUnreadableError`, nothing moved.
- `meta.json` unreadable, or saying training reached step N while no checkpoint is on disk:
  `CheckpointUnreadableError` (never a silent restart from scratch).
- a resume with a config that would change the result (another seed, learning rate, batch size, step count...):
  `ConfigChangedError` naming the fields, unless `train.allow_config_change` is set; then the change is recorded in
  `meta.json`'s `history` (docs/reliability.md, "The run record": each unit's `meta.json` holds the full config it
  trained with).
- a state holding NaN/inf is never saved (`loop` checks it before every save), so every step on disk can be resumed.
- a second process training the same unit into the same directory: `UnitBusyError` (an advisory `flock` on
  `<unit dir>/.lock`, released by the kernel when the holder dies, even by `kill -9`).
- a workdir that cannot be written (read-only, full, no permission): `CheckpointWriteError`; the steps already on
  disk are untouched.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dblocks import files, logs
# the run record (meta.json) lives in run_record; its names are re-exported here for the callers of checkpoint
from dblocks.run_record import (META, CheckpointMismatchError, CheckpointUnreadableError,  # noqa: F401
                                 ConfigChangedError, check_compatible, diff_dicts, read_json, record_so_far,
                                 signature_differences, signature_hash, unit_meta)

QUARANTINE = "quarantine"
LOCK = ".lock"


class UnitBusyError(RuntimeError):
    """Another live process is training this unit into the same directory."""


class CheckpointWriteError(OSError):
    """The unit directory cannot be written (read-only, full, no permission); nothing on disk was lost."""


WRITE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)
WRITE_ERROR_WORDS = ("No space left", "Read-only file system", "Permission denied", "Disk quota", "RESOURCE_EXHAUSTED")


def is_out_of_memory(e: BaseException) -> bool:
    """Device or host memory ran out (XLA reports it as RESOURCE_EXHAUSTED, like tensorstore's full disk)."""
    text = str(e)
    return isinstance(e, MemoryError) or ("RESOURCE_EXHAUSTED" in text and "Error writing" not in text and any(
        w in text.lower() for w in ("out of memory", "allocat", "oom")))


def is_write_error(e: BaseException) -> bool:
    """An error that means 'the disk refused the write' (also when tensorstore reports it as a plain message); an
    out-of-memory error is not one."""
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
        return True
    return not is_out_of_memory(e) and any(w in str(e) for w in WRITE_ERROR_WORDS)


def write_json_atomic(path: str, obj: Any) -> None:
    """JSON, atomically (files.write_atomic): readers see the old or the new file."""
    files.write_atomic(path, lambda f: json.dump(obj, f, indent=1, sort_keys=True, default=str), mode="w")


# -- one trainer per unit directory ------------------------------------------------------------------------------

_HELD: dict[str, list] = {}   # directory -> [open lock file, count]: a process may open its own unit twice


def _acquire_lock(directory: str) -> None:
    if directory in _HELD:
        _HELD[directory][1] += 1
        return
    path = os.path.join(directory, LOCK)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise UnitBusyError(f"{directory} is being trained by another process ({holder}); two trainers of one unit "
                            f"would overwrite each other's checkpoints. Wait for it to finish (or stop it), then "
                            f"rerun; to train other blocks at the same time use --config.blocks.train.") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _HELD[directory] = [f, 1]


def _release_lock(directory: str) -> None:
    held = _HELD.get(directory)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        fcntl.flock(held[0], fcntl.LOCK_UN)
        held[0].close()
        del _HELD[directory]


@contextlib.contextmanager
def hold_locks(directories: list[str]):
    """Holds the lock of every unit directory (created if needed) for the block: a trainer takes all of its units'
    locks before it writes anything into the workdir, so a refused second trainer changes nothing. Process 0 only
    (in a multi-process run the others write no files)."""
    held: list[str] = []
    try:
        if jax.process_index() == 0:
            for d in map(os.path.abspath, directories):
                try:
                    os.makedirs(d, exist_ok=True)
                    _acquire_lock(d)
                except OSError as e:
                    if isinstance(e, UnitBusyError) or not is_write_error(e):
                        raise
                    raise CheckpointWriteError(e.errno or errno.EIO, f"cannot lock {d}: {_short(e)}. The workdir "
                                               f"must be writable; nothing was changed.") from None
                held.append(d)
        yield
    finally:
        for d in reversed(held):
            _release_lock(d)


STALE_PATTERNS = (".orbax-checkpoint-tmp", f"{META}.tmp.")


def remove_stale_temporaries(directory: str) -> list[str]:
    """Removes what an interrupted save left in a unit directory (Orbax's `<step>.orbax-checkpoint-tmp*`
    directories, `meta.json.tmp.<pid>` files). Call only while holding the unit's lock: no save is in flight then.
    Returns the names removed."""
    gone = []
    for name in sorted(os.listdir(directory)):
        if any(p in name for p in STALE_PATTERNS):
            path = os.path.join(directory, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            gone.append(name)
    if gone:
        logs.log.info("removed %d interrupted save(s) from %s: %s", len(gone), directory, ", ".join(gone))
    return gone


# -- integrity of a restored step ----------------------------------------------------------------------------------

@jax.jit
def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _restore_args(abstract_state: Any, partial: bool) -> ocp.args.CheckpointArgs:
    if not partial:
        return ocp.args.StandardRestore(abstract_state)
    return ocp.args.PyTreeRestore(abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(
        abstract_state), partial_restore=True)


def state_problems(state: Any, abstract: Any, step: int) -> list[str]:
    """What is wrong with a restored step: its tree, shapes or dtypes differ from the expected (abstract) state,
    its step counter is not the step it is filed under, or it holds NaN/inf."""
    if jax.tree.structure(state) != jax.tree.structure(abstract):
        return ["its tree differs from the expected train state"]
    p = []
    for (path, x), a in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(abstract)):
        if tuple(x.shape) != tuple(a.shape) or x.dtype != a.dtype:
            p.append(f"{jax.tree_util.keystr(path)} is {x.dtype}{list(x.shape)}, expected {a.dtype}{list(a.shape)}")
    if p:
        return p[:5]
    if isinstance(state, dict) and "step" in state and int(state["step"]) != step:
        p.append(f"its step counter says {int(state['step'])}")
    if not bool(all_finite(state)):
        p.append("it holds NaN or inf values")
    return p


@contextlib.contextmanager
def _quiet_libraries():
    """Orbax and asyncio log a screen of traceback for a step that cannot be read; the caller reports it in one
    line, so their loggers are muted meanwhile."""
    loggers = [logging.getLogger(n) for n in ("absl", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _short(e: BaseException) -> str:
    """The first line of the innermost cause (tensorstore's wrapper messages are screens of JSON)."""
    seen = [e]
    while (seen[-1].__cause__ or seen[-1].__context__) is not None and len(seen) < 20:
        seen.append(seen[-1].__cause__ or seen[-1].__context__)
    root = seen[-1]
    line = (str(root).strip().splitlines() or [""])[0]
    return f"{type(root).__name__}: {line[:300]}"


class UnitCheckpoint:
    """The checkpoint directory of one unit (block or e2e). With read_only (assembly, sampling), no lock is taken
    and nothing is written or moved."""

    def __init__(self, directory: str, meta: dict, every: int = 1000, keep: int = 2, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self.meta = meta
        self.read_only = read_only
        if not read_only:
            try:
                os.makedirs(self.directory, exist_ok=True)
            except OSError as e:
                raise self._write_error(e, "create") from None
        self._carried, self._change = record_so_far(self.directory, meta, check_config=not read_only)
        self._locked = not read_only and jax.process_index() == 0
        if self._locked:
            try:
                _acquire_lock(self.directory)
                remove_stale_temporaries(self.directory)
            except OSError as e:
                if isinstance(e, UnitBusyError) or not is_write_error(e):
                    raise
                raise self._write_error(e, "lock") from None
        try:
            # On a mesh several units save at the same step at once; in a multi-process run Orbax synchronises each
            # save with barriers named by step, so each unit's manager gets its own barrier prefix (else two
            # blocks' saves of step s collide: "Barrier _async_write_complete.s is already ongoing").
            prefix = str(meta.get("unit") or os.path.basename(self.directory))
            self.manager = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep, save_interval_steps=every, create=not read_only, read_only=read_only,
                    multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix)))
            self._check_steps_against_meta()
        except BaseException:
            self._unlock()
            raise

    def _check_steps_against_meta(self) -> None:
        """meta.json says training got to step N > 0, but no checkpoint is on disk: refuse to start from zero."""
        path = os.path.join(self.directory, META)
        if self.manager.latest_step() is not None or not os.path.exists(path):
            return
        reached = int(read_json(path).get("step") or 0)
        if reached > 0:
            raise CheckpointUnreadableError(
                f"{self.directory}/meta.json says training reached step {reached}, but no checkpoint is on disk "
                f"(deleted or moved?). Refusing to restart it from scratch silently: put the step directories back, "
                f"or delete {path} to train this unit from step 0.")

    def _write_error(self, e: BaseException, what: str) -> CheckpointWriteError:
        steps = self.manager.all_steps() if hasattr(self, "manager") else []
        kept = f"the checkpoints on disk (steps {list(steps)}) are intact" if steps else "nothing was lost"
        return CheckpointWriteError(e.errno if isinstance(e, OSError) and e.errno else errno.EIO,
                                    f"cannot {what} in {self.directory}: {_short(e)}. The workdir must be writable "
                                    f"and have free space; {kept}. Rerun the same command once it is fixed.")

    def write_meta(self, **extra) -> None:
        """meta.json = this run's meta, what earlier runs recorded (history), and `extra` (step, complete). The first
        write after an allowed config change adds {step, changed} to the history."""
        if self._change and "step" in extra:
            self._carried["history"] = [*self._carried.get("history", []),
                                        {"step": int(extra["step"]), "changed": self._change}]
            self._change = []
        if jax.process_index() == 0 and not self.read_only:
            try:
                write_json_atomic(os.path.join(self.directory, META), {**self.meta, **self._carried, **extra})
            except OSError as e:
                raise self._write_error(e, "write meta.json") from None

    def latest_step(self) -> int | None:
        """The newest step on disk, unchecked (see verified_latest_step)."""
        return self.manager.latest_step()

    def verified_latest_step(self, abstract_state: Any) -> int | None:
        """The newest step that restores and passes the integrity check (bad newer ones are moved aside, as in
        `restore`); None when there is no step at all. For a trainer that must know each unit's start before it
        restores (the mesh groups units by start step); the state read is dropped."""
        if self.manager.latest_step() is None:
            return None
        state = self.restore(abstract_state)
        step = int(state["step"]) if isinstance(state, dict) and "step" in state else self.manager.latest_step()
        del state
        return step

    def restore(self, abstract_state: Any, step: int | None = None, partial: bool = False) -> Any:
        """The newest good step at or before `step` (default: the latest). A step that cannot be read or fails the
        integrity check is moved aside with a warning, and the next older one is tried; read `state['step']` for
        the step actually restored. No good step: CheckpointUnreadableError, and nothing is moved.
        With `partial`, abstract_state may hold only some entries of the saved state (e.g. step and params): only
        those are read, the rest (the optimizer state) never leaves the disk."""
        steps = sorted((s for s in self.manager.all_steps() if step is None or s <= step), reverse=True)
        failures: list[tuple[int, str]] = []
        for s in steps:
            try:
                with _quiet_libraries():
                    state = self.manager.restore(s, args=_restore_args(abstract_state, partial))
                problems = state_problems(state, abstract_state, s)
            except Exception as e:  # noqa: BLE001 - whatever stops a step from being read makes it unusable
                problems = [_short(e)]
            if not problems:
                for bad, why in failures:
                    self._quarantine(bad, why, good=s)
                return state
            failures.append((s, "; ".join(problems)))
        where = f"at or before step {step}" if step is not None else "at all"
        details = "".join(f"\n  - step {s}: {why}" for s, why in failures) or " (no step directory found)"
        raise CheckpointUnreadableError(
            f"{self.directory}: no readable checkpoint {where}{details}\nNothing was moved or deleted. If the code "
            f"or config changed since these were written, go back to it; to train this unit from scratch, move "
            f"{self.directory} aside.")

    def _quarantine(self, step: int, why: str, good: int) -> None:
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.directory, QUARANTINE, str(step))
        n = 1
        while os.path.exists(dst):
            dst, n = os.path.join(self.directory, QUARANTINE, f"{step}.{n}"), n + 1
        if jax.process_index() == 0 and not self.read_only and os.path.exists(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.move(src, dst)
            logs.log.warning("[%s] checkpoint step %d is unusable (%s); moved it to %s and resumed from step %d",
                             self.meta.get("unit"), step, why, dst, good)
            self.manager.reload()
        else:
            logs.log.warning("[%s] checkpoint step %d is unusable (%s); using step %d", self.meta.get("unit"), step,
                             why, good)

    def save(self, step: int, state: Any, force: bool = False) -> bool:
        try:
            return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
        except Exception as e:
            if is_write_error(e):
                raise self._write_error(e, f"save step {step}") from None
            raise

    def wait_until_finished(self) -> None:
        """Blocks until the pending (async) save is on disk; a refused write is a CheckpointWriteError."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            if is_write_error(e):
                raise self._write_error(e, "finish saving") from None
            raise

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        except Exception as e:
            if is_write_error(e):
                raise self._write_error(e, "finish saving") from None
            raise
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self._locked:
            self._locked = False
            _release_lock(self.directory)


