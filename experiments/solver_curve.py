r"""FID against block calls for each solver, on a trained DiT workdir (docs/solvers.md).

  python -m experiments.solver_curve --workdir runs/solver_dit --out runs/solver_dit/solver_curve.json \
      --plot docs/images/solver_curve.png

For each solver and each budget of block calls (default 6, 10, 20, 50) the chain uses the most grid points that fit
the budget (`sampling.points_for_calls`: Heun costs 2n - 1 calls on n points), and, with --same_points, Heun also
runs on the grids Euler uses (the "never worse than Euler at the same grid" check). Each point is the task's own
evaluation (`task.evaluate`: FID in the project's FeatureNet features against the test split) on `--num_samples`
class-balanced samples with the config's guidance.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from dblocks import assemble, logs, sampling


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
           same_points: bool, seed: int = 0, out_path: str | None = None, order: list[tuple[str, int, str]] = ()
           ) -> list[dict]:
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
                                grid_kind=kind, cache_dir=cache_dir, seed=seed)
        row = {"solver": solver, "grid_points": n, "grid_kind": kind, "block_calls": res["block_calls_per_sample"],
               "fid": res["headline"]["value"], "seed": seed, "seconds": round(time.time() - t0, 1)}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default=None, help="JSON rows (default WORKDIR/solver_curve.json)")
    parser.add_argument("--plot", default=None, help="PNG of FID against block calls")
    parser.add_argument("--calls", default="6,10,20,50")
    parser.add_argument("--solvers", default=",".join(sampling.SOLVERS))
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--grid_kind", default="cdf", choices=list(sampling.GRID_KINDS))
    parser.add_argument("--seed", type=int, default=0, help="the samples' noise (the same for every point)")
    parser.add_argument("--cache_dir", default=None, help="FID feature network cache")
    parser.add_argument("--same_points", action="store_true", help="also Heun on Euler's grids")
    parser.add_argument("--first", default="", help="solver:calls[:grid] to evaluate first, e.g. "
                        "euler:50,dpmpp_2m:20:karras (grid: --grid_kind unless given)")
    args = parser.parse_args()
    try:
        first = parse_first(args.first, args.grid_kind)
    except ValueError as e:
        parser.exit(2, f"solver_curve: {e}\n")
    logs.setup()
    out = args.out or os.path.join(args.workdir, "solver_curve.json")
    rows = points(args.workdir, [int(c) for c in args.calls.split(",")], args.solvers.split(","), args.num_samples,
                  args.grid_kind, args.cache_dir, args.same_points, seed=args.seed, out_path=out, order=first)
    print("| solver | grid | grid points | block calls | FID |\n|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["solver"], r["grid_kind"], r["block_calls"])):
        print(f"| {r['solver']} | {r['grid_kind']} | {r['grid_points']} | {r['block_calls']} | {r['fid']:.2f} |")
    if args.plot:
        kinds = "/".join(sorted({r["grid_kind"] for r in rows}))
        print("plot:", plot(rows, args.plot, f"Fashion-MNIST DiT, B=3, {kinds} grid, {args.num_samples} samples"))


if __name__ == "__main__":
    main()
