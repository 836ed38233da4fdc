"""Time to erasure on the toy model: esd-lora's fast default, esd-lora with the paper's sampling, and
classic ESD, on the same concepts.

    python benchmarks/time_to_erasure.py [--concepts red star striped] [--n 16] [--max-steps 3000]

Methods, all from the concept's shipped recipe in recipes/toy/:
- `esd-lora`: the recipe as shipped, with esd-lora's fast defaults;
- `esd-lora-paper`: the same LoRA, with the paper's sampling: a fresh partial 50-step DDIM run per step,
  batch 1;
- `classic`: the paper's settings, full esd-x weights trained directly with a frozen copy as teacher,
  Adam at a constant lr 1e-5, batch 1, the paper's sampling, no preserve prompts.

At steps 20, 30, 45, 68, 101, 152, ... (each 1.5 times the last, the same relative resolution for
every method) the evaluator measures the erasure: the concept by name and synonyms, the other concepts of
its kind, `--n` images per prompt, as a fraction of the base's rates. Training stops once efficacy (the
highest detection rate among prompts naming the concept) is <= 10 % and specificity (the lowest rate kept
by another concept, as a fraction of base) is >= 90 %, or at `--max-steps`. esd-lora runs first; each
reference method then also stops (after one last measurement) once its training time passes the bar it
is held to times esd-lora's (3x for esd-lora-paper, 10x for classic): past that point the ratio is known
to meet the bar whatever happens later, so the table gives it as a bound (`<`). `--no-budget` runs them
on. Training time excludes the measurements. Each run is its own process, so its peak memory is its own.
Finished runs are kept in build/time_to_erasure/results.json (pass --fresh to redo them); the table goes
to benchmarks/TIME_TO_ERASURE.md after every run.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "time_to_erasure"
PAPER_SAMPLING = ["train.refresh_every=1", "train.ddim_steps=50", "train.batch=1"]
METHODS = {
    "esd-lora": [],
    "esd-lora-paper": PAPER_SAMPLING,
    "classic": ["adapter=none", "adapter.targets=esd-x", "train.optimizer=adam", "train.lr=1e-5",
                "train.warmup_steps=0", "train.lr_schedule=constant", "train.sampler=trained", "concept.preserve=[]",
                *PAPER_SAMPLING],
}

# the bars a reference method is held to: esd-lora must reach the target in at most 1/bar of its time
BARS = {"esd-lora-paper": 3, "classic": 10}


def check_steps(last: int, first: int = 20, growth: float = 1.5) -> list[int]:
    """Steps at which the erasure is measured: a geometric series ending exactly at `last`."""
    steps, s = [], float(first)
    while round(s) < last:
        steps.append(round(s))
        s *= growth
    return sorted(set(steps)) + [last]


def run(method: str, concept: str, n: int, max_steps: int, max_seconds: float | None = None) -> dict:
    """Train one method on one concept, measuring as it goes; returns its trajectory and final figures.

    With max_seconds, training also stops (after one last measurement) once its training time passes it."""
    from esd_lora.evaluate import detection_rates, rates_with_roles, summarize
    from esd_lora.models import load_pipeline
    from esd_lora.recipe import load_recipe
    from esd_lora.toy.scoring import ToyScorer
    from esd_lora.train import train

    overrides = [f"output.dir={WORK / concept / method}", "output.checkpoint_every=0", *METHODS[method]]
    recipe = load_recipe(ROOT / "recipes" / "toy" / f"{concept}.yaml", overrides)
    recipe.train.steps = max_steps
    scorer = ToyScorer()
    prompts = scorer.default_prompts([concept])
    base, _ = detection_rates(load_pipeline("toy"), prompts, n, 0, scorer, progress=False)
    checks = set(check_steps(max_steps))
    trajectory, eval_seconds, start = [], [0.0], time.time()

    def on_step(step: int, pipe) -> bool:
        t0 = time.time()
        train_seconds = t0 - start - eval_seconds[0]
        over_budget = max_seconds is not None and train_seconds >= max_seconds
        if step not in checks and not over_budget:
            return False
        rates, _ = detection_rates(pipe, prompts, n, 0, scorer, progress=False)
        eval_seconds[0] += time.time() - t0
        s = summarize(rates_with_roles(base, rates, [concept], scorer))
        trajectory.append({"step": step, "train_seconds": round(train_seconds, 1),
                           "efficacy": s["efficacy_max_detection"], "specificity": s["specificity_min_ratio"]})
        print(json.dumps(trajectory[-1]), file=sys.stderr, flush=True)
        return over_budget or (s["efficacy_max_detection"] <= 0.1 and s["specificity_min_ratio"] >= 0.9)

    summary = train(recipe, progress=False, on_step=on_step)
    last = trajectory[-1]
    reached = last["efficacy"] <= 0.1 and last["specificity"] >= 0.9
    stopped = "target" if reached else "time budget" if last["step"] < max_steps else "step limit"
    return {"method": method, "concept": concept, "reached": reached, "stopped": stopped, "steps": last["step"],
            "train_seconds": last["train_seconds"], "efficacy": last["efficacy"],
            "specificity": last["specificity"], "peak_memory_mb": summary["peak_memory_mb"],
            "trajectory": trajectory}


def report(rows: dict[str, dict], argv: list[str]) -> str:
    import torch

    from esd_lora import __version__

    lines = ["# Time to erasure on the toy model", "",
             f"`python benchmarks/time_to_erasure.py {' '.join(argv)}` on {platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, esd-lora {__version__}. "
             "Target: efficacy <= 10 % and specificity >= 90 %. Training time excludes the measurements.", "",
             "| concept | method | target reached | stopped by | steps | training time (s) | efficacy | specificity | "
             "peak memory (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['concept']} | {r['method']} | {'yes' if r['reached'] else 'no'} | "
                     f"{r['stopped']} | {r['steps']} | "
                     f"{r['train_seconds']} | {r['efficacy']:.0%} | {r['specificity']:.0%} | "
                     f"{r['peak_memory_mb']:,.0f} |")
    lines += ["", "Ratios of training time (and peak memory) to reach the target; a run that did not reach it "
              "(within the step limit or its time budget) gives a bound, marked `<`.", "",
              "| concept | esd-lora / classic | esd-lora / esd-lora-paper | esd-lora-paper / classic | "
              "memory, esd-lora / classic |", "|---|---|---|---|---|"]
    for concept in dict.fromkeys(r["concept"] for r in rows.values()):
        cells = []
        for a, b in (("esd-lora", "classic"), ("esd-lora", "esd-lora-paper"), ("esd-lora-paper", "classic")):
            ra, rb = rows.get(f"{concept}/{a}"), rows.get(f"{concept}/{b}")
            if not (ra and rb):
                cells.append("not run")
            elif ra["reached"] and rb["reached"]:
                cells.append(f"{ra['train_seconds'] / rb['train_seconds']:.3f}")
            elif ra["reached"]:
                cells.append(f"< {ra['train_seconds'] / rb['train_seconds']:.3f}")
            else:
                cells.append("not reached")
        lora, classic = rows.get(f"{concept}/esd-lora"), rows.get(f"{concept}/classic")
        memory = f"{lora['peak_memory_mb'] / classic['peak_memory_mb']:.2f}" if lora and classic else "not run"
        lines.append(f"| {concept} | {' | '.join(cells)} | {memory} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", nargs="+", default=["red", "star", "striped"], help="recipes in recipes/toy/")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--n", type=int, default=16, help="images per prompt at each measurement")
    ap.add_argument("--max-steps", type=int, default=3000, help="step limit (the paper trains 1000 steps)")
    ap.add_argument("--no-budget", action="store_true",
                    help="run the reference methods to the target or the step limit, without a time budget")
    ap.add_argument("--max-seconds", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--fresh", action="store_true", help="redo runs already in the results file")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "CONCEPT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run(*args.one, args.n, args.max_steps, args.max_seconds)))
        return
    from esd_lora.io import atomic_write_json, atomic_write_text

    results = WORK / "results.json"
    rows = json.loads(results.read_text()) if results.exists() and not args.fresh else {}
    argv = [a for a in sys.argv[1:] if a != "--fresh"]
    for concept in args.concepts:
        for method in args.methods:
            key = f"{concept}/{method}"
            if key in rows:
                continue
            fast = rows.get(f"{concept}/esd-lora")
            budget = []
            if method in BARS and fast and fast["reached"] and not args.no_budget:
                budget = ["--max-seconds", str(BARS[method] * fast["train_seconds"])]
            done = subprocess.run([sys.executable, __file__, "--n", str(args.n), "--max-steps", str(args.max_steps),
                                   *budget, "--one", method, concept], check=True, stdout=subprocess.PIPE, text=True)
            rows[key] = json.loads(done.stdout.strip().splitlines()[-1])
            WORK.mkdir(parents=True, exist_ok=True)
            atomic_write_json(results, rows)
            atomic_write_text(ROOT / "benchmarks" / "TIME_TO_ERASURE.md", report(rows, argv))
            print(f"{key}: {'reached' if rows[key]['reached'] else 'not reached'} at step {rows[key]['steps']}, "
                  f"{rows[key]['train_seconds']} s", flush=True)
    print(report(rows, argv))


if __name__ == "__main__":
    main()
