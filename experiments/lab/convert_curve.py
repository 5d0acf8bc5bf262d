r"""The conversion curve: test quality against block steps, blocks converted from a trained end-to-end run vs blocks
trained from scratch (docs/lab/conversion.md).

  python -m experiments.lab.convert_curve --config experiments/configs/fashion_mnist_vit.py --root runs/h2/vit \
      --steps 1200 --out docs/lab/results/conversion/vit.json --plot docs/lab/results/conversion/vit.png
  python -m experiments.lab.convert_curve --config experiments/configs/fashion_mnist_dit.py --root runs/h2/dit \
      --steps 600 --eval num_samples=500 --eval repeats=1 --eval grid_points=20 \
      --out docs/lab/results/conversion/dit.json

Stages (--stages, default all, in this order; a stage whose output exists is skipped, so a killed run resumes):
  e2e      python -m experiments.train --config C --workdir ROOT/e2e --config.method=e2e   (S steps)
  convert  python -m experiments.convert --from ROOT/e2e --to ROOT/conv --config C
  conv     python -m experiments.train --config C --workdir ROOT/conv                      (S steps per block)
  scratch  python -m experiments.train --config C --workdir ROOT/scratch                   (S steps per block)
  eval     the task's own evaluation (`task.evaluate`, as experiments.evaluate) of both block runs at each kept
           checkpoint step round(f * S) for f in --fractions, and of the e2e run at S
Every training gets the same overrides: train.steps = S, train.ckpt_every = the gcd of the evaluated steps, and
enough kept checkpoints, so the curve is read from one run per arm (its learning-rate schedule spans S: the point
at S/2 is a checkpoint halfway through a run of S steps, not a run of S/2 steps). The blocks of both arms train with
a fresh optimizer; the converted arm starts from the e2e weights (dblocks/convert.py), the scratch arm from the
usual random init. Step 0 of the scratch arm is that init (`steps.init_key`, as the trainer draws it).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import jax
from absl import flags

from dblocks import assemble
from dblocks import checkpoint as ckpt_lib
from dblocks import logs, steps
from dblocks.config import ConfigError
from experiments.common import run_main

STAGES = ("e2e", "convert", "conv", "scratch", "eval")
ARMS = ("e2e", "conv", "scratch")


def train_overrides(total: int, eval_steps: list[int], extra: list[str]) -> list[str]:
    every = math.gcd(*[s for s in eval_steps if s > 0]) if any(eval_steps) else total
    keep = total // every + 2
    return [f"--config.train.steps={total}", f"--config.train.ckpt_every={every}",
            f"--config.train.keep_checkpoints={keep}"] + list(extra)


def eval_steps_for(total: int, fractions: list[float]) -> list[int]:
    return sorted({int(round(f * total)) for f in fractions})


def commands(config: str, root: str, over: list[str], e2e_over: list[str]) -> dict[str, list[str]]:
    py = [sys.executable, "-m"]
    return {
        "e2e": py + ["experiments.train", "--config", config, "--workdir", f"{root}/e2e", "--config.method=e2e"]
        + e2e_over,
        "convert": py + ["experiments.convert", "--from", f"{root}/e2e", "--to", f"{root}/conv", "--config", config]
        + over,
        "conv": py + ["experiments.train", "--config", config, "--workdir", f"{root}/conv"] + over,
        "scratch": py + ["experiments.train", "--config", config, "--workdir", f"{root}/scratch"] + over,
    }


def _done(root: str, stage: str) -> bool:
    if stage == "convert":
        return os.path.isdir(os.path.join(root, "conv", "blocks"))
    work = os.path.join(root, {"e2e": "e2e", "conv": "conv", "scratch": "scratch"}[stage])
    try:
        assemble.load_run(work, method="e2e" if stage == "e2e" else "dblocks")
        return True
    except Exception:  # noqa: BLE001 - missing or unfinished: (re)run the stage, which resumes
        return False


def load_at(workdir: str, step: int, method: str | None = None) -> assemble.Run:
    """The run of `workdir` with every unit at checkpoint `step` (step 0 of a run that saved none: the trainer's
    init). Refuses a step that is not on disk (restore would silently fall back to an older one)."""
    run = assemble.load_run(workdir, method=method, allow_incomplete=True)
    task, config = run.task, run.config
    tx = steps.make_optimizer(config.optim, int(config.train.steps))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    params = []
    for u, model in zip(run.units, run.models):
        ck = ckpt_lib.UnitCheckpoint(os.path.join(workdir, u.subdir()), ckpt_lib.unit_meta(task, u, config),
                                     read_only=True)
        on_disk = list(ck.manager.all_steps())
        if step not in on_disk:
            ck.close()
            if step != 0:
                raise ValueError(f"{workdir}/{u.subdir()} has no checkpoint at step {step} (on disk: {on_disk})")
            params.append(task.init_params(model, steps.init_key(int(config.seed), u.index), task.dummy_batch()))
            continue
        abstract = jax.eval_shape(lambda m=model: steps.init_state(
            task.init_params(m, jax.random.PRNGKey(0), task.dummy_batch()), tx, float(config.optim.ema_decay)))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
        state = ck.restore(abstract, step=step)
        ck.close()
        if int(state["step"]) != step:
            raise ValueError(f"{workdir}/{u.subdir()}: asked for step {step}, restored {int(state['step'])}")
        params.append(state["ema"] if state["ema"] else state["params"])
    return dataclasses.replace(run, params=params)


def evaluate_at(workdir: str, step: int, options: dict, method: str | None = None) -> dict:
    t0 = time.time()
    run = load_at(workdir, step, method)
    res = run.task.evaluate(run, **options)
    h = res["headline"]
    return {"step": step, "metric": h["name"], "value": h["value"], "higher_is_better": h["higher_is_better"],
            "block_calls_per_sample": res.get("block_calls_per_sample"), "seconds": round(time.time() - t0, 1)}


def steps_to_reach(curve: list[dict], target: float, higher: bool) -> int | None:
    """The first evaluated step whose value is at least as good as target (None: never)."""
    for row in sorted(curve, key=lambda r: r["step"]):
        if (row["value"] >= target) if higher else (row["value"] <= target):
            return row["step"]
    return None


def summarise(result: dict) -> dict:
    conv, scratch = result["arms"]["conv"], result["arms"]["scratch"]
    if not conv or not scratch:
        return {}
    total = result["steps"]
    final = max(scratch, key=lambda r: r["step"])
    higher = final["higher_is_better"]
    reach = steps_to_reach(conv, final["value"], higher)
    half = [r for r in conv if r["step"] <= total // 2]
    best_half = (max if higher else min)(half, key=lambda r: r["value"]) if half else None
    return {"scratch_at_full": final["value"], "conv_steps_to_scratch_full": reach,
            "conv_best_within_half": best_half and best_half["value"],
            "criterion_met": reach is not None and reach <= total // 2,
            "shortfall_at_half": best_half and round((final["value"] - best_half["value"]) * (1 if higher else -1), 5)}


def plot(result: dict, path: str, also: list[tuple[str, str]] = ()) -> None:
    """The curve of both arms, the e2e run as a line, and the converted arm of each (JSON, label) in `also` (e.g. a
    run with a shorter budget, hence its own learning-rate schedule)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for arm, label in (("conv", "converted from e2e"), ("scratch", "from scratch")):
        pts = sorted((r["step"], r["value"]) for r in result["arms"][arm])
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    for other, label in also:
        pts = sorted((r["step"], r["value"]) for r in json.load(open(other))["arms"]["conv"])
        ax.plot(*zip(*pts), marker="*", ls=":", ms=9, label=label)
    if result.get("e2e"):
        ax.axhline(result["e2e"]["value"], color="gray", ls="--",
                   label=f"e2e at {result.get('e2e_steps', result['steps'])} steps")
    rows = result["arms"]["conv"] or result["arms"]["scratch"]
    ax.set_xlabel("block steps (each block)")
    ax.set_ylabel(rows[0]["metric"] if rows else "")
    ax.set_title(result["title"], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_options(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, v = it.split("=", 1)
        for cast in (int, float):
            try:
                v = cast(v)
                break
            except ValueError:
                pass
        out[k] = v
    return out


def main(argv):
    del argv
    a = flags.FLAGS
    try:
        fractions = [float(f) for f in a.fractions]
        options = _parse_options(a.eval)
    except ValueError as e:
        raise ConfigError(f"--fractions or --eval: {e} (fractions are numbers, options key=value)") from None
    for name, allowed in (("stages", STAGES), ("arms", ARMS)):
        if set(a[name].value) - set(allowed):
            raise ConfigError(f"--{name} {','.join(a[name].value)}: each one of {','.join(allowed)}")
    logs.setup()
    total = a.steps
    at = eval_steps_for(total, fractions)
    over = train_overrides(total, at, a.override)
    e2e_total = a.e2e_steps or total
    cmds = commands(a.config, a.root, over, train_overrides(e2e_total, [e2e_total], a.override))
    stages = a.stages
    result = {"config": a.config, "root": a.root, "steps": total, "e2e_steps": e2e_total, "eval_steps": at,
              "eval_options": options,
              "commands": {k: " ".join(["python"] + v[1:]) for k, v in cmds.items()}, "wall_seconds": {},
              "arms": {"conv": [], "scratch": []}, "e2e": None,
              "title": f"{os.path.basename(a.config)}: {total} steps (e2e, and per block)"}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)

    def merge():   # what another process (or an earlier run) wrote into the same file
        if not os.path.exists(a.out):
            return
        old = json.load(open(a.out))
        result["wall_seconds"] = {**old.get("wall_seconds", {}), **result["wall_seconds"]}
        if old.get("steps") != total:
            return
        result["e2e"] = result["e2e"] or old.get("e2e")
        for arm, rows in old.get("arms", {}).items():
            have = {r["step"] for r in result["arms"][arm]}
            result["arms"][arm] = sorted(result["arms"][arm] + [r for r in rows if r["step"] not in have],
                                         key=lambda r: r["step"])

    def save():
        merge()
        result["summary"] = summarise(result)
        with open(a.out + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(a.out + ".tmp", a.out)

    for stage in [s for s in STAGES[:-1] if s in stages]:
        if _done(a.root, stage):
            logs.log.info("%s: already done", stage)
            continue
        logs.log.info("%s: %s", stage, " ".join(cmds[stage]))
        t0 = time.time()
        subprocess.run(cmds[stage], check=True)
        result["wall_seconds"][stage] = round(time.time() - t0, 1)
        save()
    arms = a.arms
    if "eval" in stages:
        merge()
        if result["e2e"] is None and "e2e" in arms:
            result["e2e"] = evaluate_at(f"{a.root}/e2e", e2e_total, options, method="e2e")
            logs.log.info("e2e: %s", result["e2e"])
            save()
        for arm in [arm for arm in ("conv", "scratch") if arm in arms and os.path.isdir(f"{a.root}/{arm}/blocks")]:
            for s in at:
                merge()
                if s in {r["step"] for r in result["arms"][arm]}:
                    continue
                row = evaluate_at(f"{a.root}/{arm}", s, options, method="dblocks")
                logs.log.info("%s: %s", arm, row)
                result["arms"][arm].append(row)
                result["arms"][arm].sort(key=lambda r: r["step"])
                save()
    save()
    if a.plot:
        plot(result, a.plot, [tuple(x.rsplit(":", 1)) for x in a.also])
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":   # flags only when run: tests import the loading and the summary
    flags.DEFINE_string("config", None, "the experiment config file", required=True)
    flags.DEFINE_string("root", None, "workdirs ROOT/e2e, ROOT/conv, ROOT/scratch", required=True)
    flags.DEFINE_integer("steps", None, "S: steps per block (and of the e2e run)", required=True, lower_bound=1)
    flags.DEFINE_integer("e2e_steps", None, "steps of the e2e run (default S); ROOT/e2e may be an existing run (a "
                         "link), e.g. to convert one e2e run into blocks of a shorter budget", lower_bound=1)
    flags.DEFINE_list("fractions", ["0", "0.125", "0.25", "0.5", "1"], "evaluated steps, as fractions of S")
    flags.DEFINE_list("stages", list(STAGES), f"stages to run, of {','.join(STAGES)}")
    flags.DEFINE_multi_string("override", [], "extra --config.x=y for every training")
    flags.DEFINE_multi_string("eval", [], "evaluation option key=value (as experiments.evaluate)")
    flags.DEFINE_list("arms", list(ARMS), f"the runs the eval stage evaluates, of {','.join(ARMS)}")
    flags.DEFINE_string("out", None, "JSON; rows already in it are kept and not evaluated again (several processes "
                        "may fill one file, e.g. one arm each)", required=True)
    flags.DEFINE_string("plot", None, "PNG of the curve")
    flags.DEFINE_multi_string("also", [], "JSON:label, another curve's converted arm to plot")
    run_main(main)
