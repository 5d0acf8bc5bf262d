"""Per-unit Orbax checkpoints and their meta (docs/design.md item 10).

WORKDIR/blocks/block_XX/ (or WORKDIR/e2e/) holds an Orbax CheckpointManager with the unit's train state
(step, params, opt_state, ema) and `meta.json`: the block id, its noise ranges, the partition and a hash of the config
fields that must agree across blocks. Orbax writes each checkpoint to a temporary directory and renames it when
complete, and `meta.json` is replaced atomically, so a killed run never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

META = "meta.json"


class CheckpointMismatchError(RuntimeError):
    """Checkpoints on disk do not belong with this config (or with each other)."""


def signature_hash(signature: dict) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def diff_dicts(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_dicts(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} != {vb!r}")
    return out


class UnitCheckpoint:
    """The checkpoint directory of one unit (block or e2e)."""

    def __init__(self, directory: str, meta: dict, every: int = 1000, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.meta = meta
        os.makedirs(self.directory, exist_ok=True)
        self._check_existing_meta()
        # On a mesh several units save at the same step at once; in a multi-process run Orbax synchronises each
        # save with barriers named by step, so each unit's manager gets its own barrier prefix (else two blocks'
        # saves of step s collide: "Barrier _async_write_complete.s is already ongoing").
        prefix = str(meta.get("unit") or os.path.basename(self.directory))
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, save_interval_steps=every, create=True,
                multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix)))

    def _check_existing_meta(self) -> None:
        check_compatible(self.directory, self.meta)

    def write_meta(self, **extra) -> None:
        if jax.process_index() == 0:
            write_json_atomic(os.path.join(self.directory, META), {**self.meta, **extra})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def save(self, step: int, state: Any, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_compatible(directory: str, meta: dict) -> None:
    """Refuses a unit directory whose meta.json comes from another config (or another block)."""
    path = os.path.join(directory, META)
    if not os.path.exists(path):
        return
    old = read_json(path)
    if old.get("signature_hash") != meta["signature_hash"] or old.get("block") != meta["block"]:
        diffs = diff_dicts(old.get("signature", {}), meta["signature"])
        raise CheckpointMismatchError(
            f"{directory} holds a checkpoint trained with a different config; refusing to resume or overwrite it. "
            f"Differences: {diffs or ['block id']}. Use another --workdir or delete that directory.")


def unit_meta(task, unit, config) -> dict:
    """The meta every block writes: what assembly checks before combining blocks."""
    sig = task.signature()
    part = task.partition()
    meta = {"block": unit.index if unit.is_block else None, "unit": unit.name, "num_layers": unit.num_layers,
            "train_range": list(unit.train_range), "signature": sig, "signature_hash": signature_hash(sig),
            "steps": int(config.train.steps), "method": "dblocks" if unit.is_block else "e2e"}
    if unit.is_block:
        meta["interval"] = list(part.interval(unit.index))
        meta["partition"] = part.to_dict()
        meta["num_blocks"] = part.num_blocks
    return meta
