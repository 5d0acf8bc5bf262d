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


def points(workdir: str, calls: list[int], solvers: list[str], num_samples: int, grid_kind: str, cache_dir: str,
           same_points: bool, seed: int = 0, out_path: str | None = None, order: list[tuple[str, int]] = ()
           ) -> list[dict]:
    """One FID per (solver, grid size); rows are appended to out_path (JSON) as they come. `order` lists
    (solver, calls) pairs to run first."""
    run = assemble.load_run(workdir)
    jobs = [(s, sampling.points_for_calls(c, s)) for s, c in order]
    jobs += [(s, sampling.points_for_calls(c, s)) for s in solvers for c in calls]
    if same_points and "heun" in solvers:
        jobs += [("heun", sampling.points_for_calls(c, "euler")) for c in calls]
    out, done = [], set()
    for solver, n in jobs:
        if (solver, n) in done:
            continue
        done.add((solver, n))
        t0 = time.time()
        res = run.task.evaluate(run, num_samples=num_samples, repeats=1, grid_points=n, solver=solver,
                                grid_kind=grid_kind, cache_dir=cache_dir, seed=seed)
        row = {"solver": solver, "grid_points": n, "grid_kind": grid_kind, "block_calls": res["block_calls_per_sample"],
               "fid": res["headline"]["value"], "seconds": round(time.time() - t0, 1)}
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
    for solver in sampling.SOLVERS:
        pts = sorted((r["block_calls"], r["fid"]) for r in rows if r["solver"] == solver)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=solver)
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
    parser.add_argument("--grid_kind", default="cdf", choices=["cdf", "karras"])
    parser.add_argument("--cache_dir", default=None, help="FID feature network cache")
    parser.add_argument("--same_points", action="store_true", help="also Heun on Euler's grids")
    parser.add_argument("--first", default="", help="solver:calls pairs to evaluate first, e.g. euler:50,dpmpp_2m:20")
    args = parser.parse_args()
    logs.setup()
    out = args.out or os.path.join(args.workdir, "solver_curve.json")
    rows = points(args.workdir, [int(c) for c in args.calls.split(",")], args.solvers.split(","), args.num_samples,
                  args.grid_kind, args.cache_dir, args.same_points, out_path=out,
                  order=[(p.split(":")[0], int(p.split(":")[1])) for p in args.first.split(",") if p])
    print("| solver | grid points | block calls | FID |\n|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["solver"], r["block_calls"])):
        print(f"| {r['solver']} | {r['grid_points']} | {r['block_calls']} | {r['fid']:.2f} |")
    if args.plot:
        print("plot:", plot(rows, args.plot, f"Fashion-MNIST DiT, B=3, {args.grid_kind} grid, "
                                             f"{args.num_samples} samples"))


if __name__ == "__main__":
    main()
