"""A unit's run record: its `meta.json` (docs/design.md items 10 and 13) and the checks a resume must pass.

`meta.json` holds what assembly checks before combining blocks (the signature and its hash, the block id, its noise
interval and the partition) and the full config the unit trained with. A resume whose config would change the result
is refused (`ConfigChangedError`, the fields listed) unless `train.allow_config_change` is set; the change is then
recorded in the meta's `history`. Fields that only say how or where the same computation runs are free to change
(`FREE_FIELDS`). The Orbax checkpoints themselves: `dblocks.checkpoint`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os

META = "meta.json"

# Config fields renamed since runs were first saved: old dotted name -> new. A saved config (WORKDIR/config.json, a
# unit's meta.json, an exported model) is read with the new names (`saved_config`), so a run trained before a rename
# loads, resumes and exports as before; a config file that still sets an old name is refused (dblocks.config).
RENAMED_FIELDS = {"sample.steps": "sample.grid_points"}   # masked diffusion's sampler steps: every task's name


def saved_config(config: dict) -> dict:
    """A copy of a saved config (a dict) with the fields of RENAMED_FIELDS under their new names."""
    out = copy.deepcopy(config)
    for old, new in RENAMED_FIELDS.items():
        (section, field), (new_section, new_field) = old.split("."), new.split(".")
        if isinstance(out.get(section), dict) and field in out[section]:
            value = out[section].pop(field)
            out.setdefault(new_section, {}).setdefault(new_field, value)
    return out


class CheckpointMismatchError(RuntimeError):
    """Checkpoints on disk do not belong with this config (or with each other)."""


class CheckpointUnreadableError(RuntimeError):
    """No usable checkpoint or meta where one should be; what is on disk is left in place."""


class ConfigChangedError(CheckpointMismatchError):
    """A resume whose config differs from the one the unit trained with, in a field that changes the result."""



def signature_hash(signature: dict) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Model fields that say how a layer is computed, not what: the parameter tree and the values (to float rounding) are
# the same either way (docs/performance.md), so blocks trained with different settings assemble together, and a
# resume may change them (e.g. turn on remat after running out of memory).
HOW_FIELDS = ("remat", "attention", "attention_chunk", "mlp_chunk", "layer_chunk")


def signature_core(signature: dict) -> dict:
    """The signature without the model's HOW_FIELDS: what two units must share to belong to one run."""
    if not isinstance(signature.get("model"), dict):
        return signature
    return {**signature, "model": {k: v for k, v in signature["model"].items() if k not in HOW_FIELDS}}


def signature_differences(meta: dict, signature: dict) -> list[str] | None:
    """None when a unit's meta.json was written by a config of this signature (HOW_FIELDS aside), else the differing
    fields (a meta without its signature, only the hash, is compared by hash)."""
    if "signature" not in meta:
        return None if meta.get("signature_hash") == signature_hash(signature) else ["signature_hash"]
    old, new = signature_core(meta["signature"]), signature_core(signature)
    return None if signature_hash(old) == signature_hash(new) else diff_dicts(old, new)



def read_json(path: str) -> dict:
    """A JSON object dblocks wrote; a truncated or corrupt one, or one that is not an object, is a
    CheckpointUnreadableError naming it."""
    try:
        with open(path) as f:
            obj = json.load(f)
        why = None if isinstance(obj, dict) else f"not a JSON object: it holds a JSON {type(obj).__name__}"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        why = f"not valid JSON (truncated or corrupt: {e})"
    if why is not None:
        raise CheckpointUnreadableError(
            f"{path} is {why}. dblocks writes it atomically, so something outside dblocks damaged it. "
            f"It records which config this directory's checkpoints belong to, so dblocks will not guess: if they were "
            f"trained with this config, delete that file and rerun the same command (it is rewritten); otherwise use "
            f"another --workdir.")
    return obj


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


# Config fields that may change between the runs of one unit: they say how and where the same computation runs, or
# what is logged and kept, not what is computed. Any other difference changes the trained parameters.
FREE_FIELDS = ("train.log_every", "train.ckpt_every", "train.ckpt_every_secs", "train.keep_checkpoints",
               "train.sample_at_end", "train.plot_at_end", "train.allow_config_change", "train.microbatches",
               "train.profile_steps", "train.eval_every", "train.preflight", "train.memory_limit_gb", "blocks.train",
               "parallel.", "data.data_dir") + tuple(f"model.{f}" for f in HOW_FIELDS)


def config_changes(old: dict, new: dict) -> list[str]:
    """The differences between two configs (dicts) that change the result: 'field: old != new', FREE_FIELDS left out."""
    return [d for d in diff_dicts(old, new) if not d.split(":")[0].startswith(FREE_FIELDS)]


def check_compatible(directory: str, meta: dict, check_config: bool = True) -> list[str]:
    """Refuses a unit directory whose meta.json comes from another config (or another block), and a resume whose
    config would change the result (ConfigChangedError) unless meta's config allows it
    (train.allow_config_change); returns the allowed changes (empty when none)."""
    path = os.path.join(directory, META)
    if not os.path.exists(path):
        return []
    old = read_json(path)
    diffs = signature_differences(old, meta["signature"])
    if diffs is not None or old.get("block") != meta["block"]:
        raise CheckpointMismatchError(
            f"{directory} holds a checkpoint trained with a different config; refusing to resume or overwrite it. "
            f"Differences: {diffs or ['block id']}. Use another --workdir or delete that directory.")
    # a unit that has trained no step yet (or a meta written before dblocks recorded configs) has nothing to protect
    if not check_config or "config" not in old or "config" not in meta or not int(old.get("step") or 0):
        return []
    changes = config_changes(saved_config(old["config"]), meta["config"])
    if changes and not meta["config"].get("train", {}).get("allow_config_change", False):
        raise ConfigChangedError(
            f"{directory} was trained to step {old.get('step')} with another config; resuming with this one would "
            f"change the result. Differences (trained with != now): {changes}. Rerun with the config it was "
            f"trained with, use another --workdir, or pass --config.train.allow_config_change=True to continue "
            f"anyway (the change is recorded in its meta.json).")
    return changes


def record_so_far(directory: str, meta: dict, check_config: bool) -> tuple[dict, list[str]]:
    """What a unit's meta.json already records that a rewrite must keep (history, conversion source), and the
    allowed config change to add to the history (check_compatible)."""
    change = check_compatible(directory, meta, check_config)
    path = os.path.join(directory, META)
    old = read_json(path) if os.path.exists(path) else {}
    return {k: old[k] for k in ("history", "converted_from") if k in old}, change


def unit_meta(task, unit, config) -> dict:
    """The meta every block writes: what assembly checks before combining blocks (the signature), and the full
    config the unit trains with (a resume that would change the result is refused, check_compatible)."""
    sig = task.signature()
    part = task.partition()
    meta = {"block": unit.index if unit.is_block else None, "unit": unit.name, "num_layers": unit.num_layers,
            "train_range": list(unit.train_range), "signature": sig, "signature_hash": signature_hash(sig),
            "steps": int(config.train.steps), "method": "dblocks" if unit.is_block else "e2e",
            "config": json.loads(config.to_json_best_effort())}
    if unit.is_block:
        meta["interval"] = list(part.interval(unit.index))
        meta["partition"] = part.to_dict()
        meta["num_blocks"] = part.num_blocks
    return meta
