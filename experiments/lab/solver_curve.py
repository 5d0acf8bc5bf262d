r"""FID against block calls for each solver, on a trained DiT workdir (docs/lab/solvers.md).

  python -m experiments.lab.solver_curve --workdir runs/solver_dit --out runs/solver_dit/solver_curve.json \
      --plot docs/images/solver_curve.png

For each solver and each budget of block calls (default 6, 10, 20, 50) the chain uses the most grid points that fit
the budget (`sampling.points_for_calls`: Heun costs 2n - 1 calls on n points), and, with --same_points, Heun also
runs on the grids Euler uses (the "never worse than Euler at the same grid" check). Each point is the task's own
evaluation (`task.evaluate`: FID in the project's FeatureNet features against `--split`: validation, to choose a
sampler, or test, to report one) on `--num_samples` class-balanced samples with the config's guidance.
"""
from __future__ import annotations

import json
import os
import time

from absl import flags

from dblocks import assemble, logs, sampling
from dblocks.config import ConfigError
from experiments.common import run_main


def parse_first(text: str, grid_kind: str) -> list[tuple[str, int, str]]:
    """'euler:50,dpmpp_2m:20:karras' -> [(solver, calls, grid kind)]; the grid kind defaults to `grid_kind`."""
    out = []
    for item in filter(None, text.split(",")):
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[0] not in sampling.SOLVERS or not parts[1].isdigit() or (
                len(parts) == 3 and parts[2] not in sampling.GRID_KINDS):
            raise ValueError(f"--first item {item!r}: use solver:calls[:grid] with a solver in {sampling.SOLVERS} "
                             f"and a grid in {sampling.GRID_KINDS}")
        out.append((parts[0], int(parts[1]), parts[2] if len(parts) == 3 else grid_kind))
    return out


def points(workdir: str, calls: list[int], solvers: list[str], num_samples: int, grid_kind: str, cache_dir: str,
           same_points: bool, seed: int = 0, out_path: str | None = None, order: list[tuple[str, int, str]] = (),
           split: str = "validation") -> list[dict]:
    """One FID per (solver, grid size, grid kind); rows are appended to out_path (JSON) as they come. `order` lists
    (solver, calls, grid kind) to run first (`parse_first`)."""
    run = assemble.load_run(workdir)
    jobs = [(s, sampling.points_for_calls(c, s), kind) for s, c, kind in order]
    jobs += [(s, sampling.points_for_calls(c, s), grid_kind) for s in solvers for c in calls]
    if same_points and "heun" in solvers:
        jobs += [("heun", sampling.points_for_calls(c, "euler"), grid_kind) for c in calls]
    out, done = [], set()
    for solver, n, kind in jobs:
        if (solver, n, kind) in done:
            continue
        done.add((solver, n, kind))
        t0 = time.time()
        res = run.task.evaluate(run, num_samples=num_samples, repeats=1, grid_points=n, solver=solver,
                                grid_kind=kind, cache_dir=cache_dir, seed=seed, split=split)
        row = {"solver": solver, "grid_points": n, "grid_kind": kind, "block_calls": res["block_calls_per_sample"],
               "fid": res["headline"]["value"], "seed": seed, "split": split, "seconds": round(time.time() - t0, 1)}
        logs.log.info("%s", row)
        out.append(row)
        if out_path:
            with open(out_path, "w") as f:
                json.dump(out, f, indent=1)
    return out


def plot(rows: list[dict], path: str, title: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    kinds = sorted({r.get("grid_kind", "cdf") for r in rows})
    for kind in kinds:
        for solver in sampling.SOLVERS:
            pts = sorted((r["block_calls"], r["fid"]) for r in rows
                         if r["solver"] == solver and r.get("grid_kind", "cdf") == kind)
            if pts:
                ax.plot(*zip(*pts), marker="o", linestyle="-" if kind == "cdf" else "--",
                        label=solver if len(kinds) == 1 else f"{solver}, {kind} grid")
    ax.set_xscale("log")
    ax.set_xlabel("block calls per sample")
    ax.set_ylabel("FID (FeatureNet features)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def main(argv):
    del argv
    try:
        first = parse_first(_FIRST.value, _GRID_KIND.value)
        calls = [int(c) for c in _CALLS.value]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if set(_SOLVERS.value) - set(sampling.SOLVERS):
        raise ConfigError(f"--solvers {','.join(_SOLVERS.value)}: each one of {', '.join(sampling.SOLVERS)}")
    logs.setup()
    out = _OUT.value or os.path.join(_WORKDIR.value, "solver_curve.json")
    rows = points(_WORKDIR.value, calls, _SOLVERS.value, _NUM_SAMPLES.value,
                  _GRID_KIND.value, _CACHE_DIR.value, _SAME_POINTS.value, seed=_SEED.value, out_path=out, order=first,
                  split=_SPLIT.value)
    print("| solver | grid | grid points | block calls | FID |\n|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["solver"], r["grid_kind"], r["block_calls"])):
        print(f"| {r['solver']} | {r['grid_kind']} | {r['grid_points']} | {r['block_calls']} | {r['fid']:.2f} |")
    if _PLOT.value:
        kinds = "/".join(sorted({r["grid_kind"] for r in rows}))
        print("plot:", plot(rows, _PLOT.value, f"Fashion-MNIST DiT, B=3, {kinds} grid, {_NUM_SAMPLES.value} samples"))


if __name__ == "__main__":   # flags only when run: tests import parse_first
    _WORKDIR = flags.DEFINE_string("workdir", None, "a trained DiT workdir", required=True)
    _OUT = flags.DEFINE_string("out", None, "JSON rows (default WORKDIR/solver_curve.json)")
    _PLOT = flags.DEFINE_string("plot", None, "PNG of FID against block calls")
    _CALLS = flags.DEFINE_list("calls", ["6", "10", "20", "50"], "budgets of block calls per sample")
    _SOLVERS = flags.DEFINE_list("solvers", list(sampling.SOLVERS), f"solvers, of {', '.join(sampling.SOLVERS)}")
    _NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1000, "samples per FID", lower_bound=1)
    _GRID_KIND = flags.DEFINE_enum("grid_kind", "cdf", list(sampling.GRID_KINDS), "sigma grid")
    _SEED = flags.DEFINE_integer("seed", 0, "the samples' noise (the same for every point)")
    _CACHE_DIR = flags.DEFINE_string("cache_dir", None, "FID feature network cache")
    _SAME_POINTS = flags.DEFINE_bool("same_points", False, "also Heun on Euler's grids")
    _SPLIT = flags.DEFINE_enum("split", "validation", ["validation", "test"], "the images FID compares with: "
                               "'validation' to choose a sampler (train with data.val_fraction > 0), 'test' to report")
    _FIRST = flags.DEFINE_string("first", "", "solver:calls[:grid] to evaluate first, e.g. euler:50,dpmpp_2m:20:karras "
                                 "(grid: --grid_kind unless given)")
    run_main(main)
