"""Exported models: one .npz with the weights of every block (their EMA by default), the config and the partition,
and no optimizer state; `load_model` turns it back into a `dblocks.assemble.Run`, so the tasks' sampling,
classification and evaluation work on it as on a workdir.

  python -m experiments.export --workdir runs/fmnist_dit --out fmnist_dit.npz

  import dblocks
  run = dblocks.load_model("fmnist_dit.npz")
  images, labels = dblocks.export.sample_images(run, num=20, seed=0)   # uint8 [20, H, W, C], generation tasks

The file holds plain arrays (np.load(..., allow_pickle=False) reads it): `__dblocks__` (JSON: format version,
method, units, partition, the metas of the blocks), `__config__` (the run's config as JSON) and one array per
parameter, named `u<unit index>/<parameter path>` (e.g. `u0/block_0/attn/query/kernel`).
"""
from __future__ import annotations

import inspect
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dblocks import assemble, files
from dblocks import partition as partition_lib
from dblocks import run_record, user_data
from dblocks.tasks import get_task

FORMAT = "dblocks-export"
VERSION = 1
_NATIVE = set("biuf")   # numpy dtype kinds np.savez stores natively (bfloat16 etc. are stored as float32)


def _flatten(tree, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        out[f"{prefix}/{key}"] = np.asarray(jax.device_get(leaf))
    return out


def _unflatten(arrays: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in arrays.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def export_run(run: assemble.Run, out: str) -> dict:
    """Writes `run` (its params as loaded: EMA or raw) to the .npz `out`. Returns a summary."""
    arrays, dtypes = {}, {}
    for i, params in enumerate(run.params):
        for key, a in _flatten(params, f"u{i}").items():
            dtypes[key] = str(a.dtype)
            arrays[key] = a if a.dtype.kind in _NATIVE else a.astype(np.float32)
    header = {"format": FORMAT, "version": VERSION, "method": run.method,
              "units": [u.name for u in run.units], "partition": run.partition.to_dict(),
              "metas": run.metas, "dtypes": dtypes}
    arrays["__dblocks__"] = np.asarray(json.dumps(header))
    arrays["__config__"] = np.asarray(run.config.to_json_best_effort())
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    files.write_atomic(out, lambda f: np.savez(f, **arrays))
    n = sum(int(np.prod(a.shape)) for k, a in arrays.items() if not k.startswith("__"))
    return {"path": out, "method": run.method, "units": len(run.units), "parameters": n,
            "bytes": os.path.getsize(out)}


def export_workdir(workdir: str, out: str, method: str | None = None, use_ema: bool = True,
                   allow_incomplete: bool = False) -> dict:
    """Assembles a trained workdir (all blocks, or the e2e network) and exports it."""
    run = assemble.load_run(workdir, method=method, use_ema=use_ema, allow_incomplete=allow_incomplete)
    return export_run(run, out)


def load_model(path: str) -> assemble.Run:
    """An exported .npz as a Run (weights on the first local device). No data and no workdir are needed."""
    with np.load(path, allow_pickle=False) as z:
        if "__dblocks__" not in z.files:
            raise ValueError(f"{path} is not a dblocks export (no __dblocks__ entry); make one with "
                             f"python -m experiments.export --workdir W --out {path}")
        header = json.loads(str(z["__dblocks__"]))
        config = ml_collections.ConfigDict(run_record.saved_config(json.loads(str(z["__config__"]))))
        arrays = {k: z[k] for k in z.files if not k.startswith("__")}
    if header.get("format") != FORMAT or int(header.get("version", 0)) > VERSION:
        raise ValueError(f"{path}: unsupported export {header.get('format')} v{header.get('version')}")
    user_data.resolve_fields(config, read_data=False)   # the saved text vocabulary, without the data
    task = get_task(config)
    units = task.units(header["method"])
    if [u.name for u in units] != header["units"]:
        raise ValueError(f"{path}: units {header['units']} do not match the config's {[u.name for u in units]}")
    device = jax.local_devices()[0]
    dtypes = header.get("dtypes", {})
    params = []
    for i in range(len(units)):
        mine = {k[len(f"u{i}/"):]: jax.device_put(jnp.asarray(a, dtypes.get(k, a.dtype)), device)
                for k, a in arrays.items() if k.startswith(f"u{i}/")}
        params.append(_unflatten(mine))
    p = header["partition"]
    part = partition_lib.Partition(boundaries=tuple(p["boundaries"]), ranges=tuple(map(tuple, p["ranges"])),
                                   gamma=float(p.get("gamma", 0.0)))
    return assemble.Run(workdir=os.path.abspath(path), config=config, task=task, method=header["method"],
                        partition=part, units=units, models=[task.make_model(u) for u in units], params=params,
                        metas=header.get("metas", []))


# -- samples as arrays (for FID tools) ---------------------------------------------------------------------------

def sample_images(run: assemble.Run, num: int, seed: int = 0, batch_size: int = 250, **options) -> tuple:
    """`num` class-balanced samples of an image-generation run (labels 0, 1, ..., C-1, 0, ...) as uint8 [N, H, W, C]
    and their int32 labels, from the task's declared `generate(run, labels, ...)`. options: the sampler's
    (grid_points, solver, guidance, grid_kind); unset ones take the config's sample section. Batches use seeds seed,
    seed + 1, ..."""
    task = run.task
    gen = task.generate
    accepted = inspect.signature(gen).parameters
    s = task.config.sample
    defaults = {k: s[k] for k in ("grid_points", "solver", "guidance") if k in s}
    kwargs = {k: v for k, v in {**defaults, **{k: v for k, v in options.items() if v is not None}}.items()
              if k in accepted}
    classes = int(run.config.data.num_classes)
    labels = (np.arange(num) % classes).astype(np.int32)
    out = []
    for j, start in enumerate(range(0, num, batch_size)):
        res = gen(run, labels[start:start + batch_size], seed=seed + j, **kwargs)
        x = np.asarray(jax.device_get(getattr(res, "denoised", res)), np.float32)
        out.append(np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8))
    return np.concatenate(out), labels
