"""Time-to-erasure on the toy model: esd-lora (LoRA, the shipped recipe) against classic ESD (the paper's
settings: esd-x weights trained directly, on-policy sampling, Adam, lr 1e-5, no preserve prompts).

    python benchmarks/time_to_erasure.py [--concept red] [--every 40] [--n 16] [--max-classic-steps 1000]

Both train on the same concept from the same recipe. Every `--every` steps the evaluator measures the
erasure (the concept by name and synonyms, the other concepts of its kind, `--n` images per prompt, as a
fraction of the base's rates); training stops once efficacy <= 10 % and specificity >= 90 %. Wall time
counts training only (evaluation time is subtracted). Each method runs in its own process, so its peak
memory is its own. Results go to benchmarks/TIME_TO_ERASURE.md.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSIC = ["adapter=none", "adapter.targets=esd-x", "train.optimizer=adam", "train.lr=1e-5", "train.batch=1",
           "train.sampler=trained", "train.ddim_steps=50", "concept.preserve=[]"]


def run(method: str, concept: str, every: int, n: int, max_classic_steps: int) -> dict:
    """Train one method with measurements at intervals; returns its trajectory and final figures."""
    from esd_lora.evaluate import Scorer, default_prompts, detection_rates, summarize
    from esd_lora.models import load_pipeline
    from esd_lora.recipe import load_recipe
    from esd_lora.toy.classifier import load_classifier
    from esd_lora.train import train

    overrides = [f"output.dir=build/time_to_erasure/{method}", "output.checkpoint_every=0"]
    if method == "classic":
        overrides += CLASSIC + [f"train.steps={max_classic_steps}"]
    recipe = load_recipe(ROOT / "recipes" / "toy" / f"{concept}.yaml", overrides)
    prompts = default_prompts([concept])
    scorer = Scorer(load_classifier())
    base, _ = detection_rates(load_pipeline("toy"), prompts, n, 0, scorer, progress=False)
    trajectory, eval_seconds, start = [], [0.0], time.time()

    def on_step(step: int, pipe) -> bool:
        if step % every:
            return False
        t0 = time.time()
        rates, _ = detection_rates(pipe, prompts, n, 0, scorer, progress=False)
        eval_seconds[0] += time.time() - t0
        s = summarize(base, rates, [concept])
        trajectory.append({"step": step, "train_seconds": round(time.time() - start - eval_seconds[0], 1),
                           "efficacy": s["efficacy_max_detection"], "specificity": s["specificity_min_ratio"]})
        print(json.dumps(trajectory[-1]), file=sys.stderr, flush=True)
        return s["efficacy_max_detection"] <= 0.1 and s["specificity_min_ratio"] >= 0.9

    summary = train(recipe, progress=False, on_step=on_step)
    reached = [p for p in trajectory if p["efficacy"] <= 0.1 and p["specificity"] >= 0.9]
    return {"method": method, "concept": concept, "reached": bool(reached),
            "steps": reached[0]["step"] if reached else summary["steps"],
            "train_seconds": reached[0]["train_seconds"] if reached else trajectory[-1]["train_seconds"],
            "final": trajectory[-1] if trajectory else None, "peak_memory_mb": summary["peak_memory_mb"],
            "trajectory": trajectory}


def report(rows: list[dict], argv: list[str]) -> str:
    import torch

    from esd_lora import __version__

    lines = ["# Time to erasure on the toy model", "",
             f"`python benchmarks/time_to_erasure.py {' '.join(argv)}` on {platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, esd-lora {__version__}.", "",
             "| method | concept | target reached | steps | training time (s) | final efficacy | "
             "final specificity | peak memory (MB) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["final"] or {}
        lines.append(f"| {r['method']} | {r['concept']} | {'yes' if r['reached'] else 'no'} | {r['steps']} | "
                     f"{r['train_seconds']} | {f.get('efficacy', float('nan')):.0%} | "
                     f"{f.get('specificity', float('nan')):.0%} | {r['peak_memory_mb']:,.0f} |")
    by = {(r["method"], r["concept"]): r for r in rows}
    lines += ["", "| concept | time, esd-lora / classic | memory, esd-lora / classic |", "|---|---|---|"]
    for concept in dict.fromkeys(r["concept"] for r in rows):
        lora, classic = by.get(("esd-lora", concept)), by.get(("classic", concept))
        if lora and classic:
            note = "" if classic["reached"] else " (classic did not reach the target: an upper bound)"
            lines.append(f"| {concept} | {lora['train_seconds'] / classic['train_seconds']:.2f}{note} | "
                         f"{lora['peak_memory_mb'] / classic['peak_memory_mb']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concept", default="red", help="a recipe in recipes/toy/ (default red)")
    ap.add_argument("--every", type=int, default=40, help="steps between measurements")
    ap.add_argument("--n", type=int, default=16, help="images per prompt at each measurement")
    ap.add_argument("--max-classic-steps", type=int, default=1000, help="the paper's 1000 steps")
    ap.add_argument("--method", choices=["esd-lora", "classic"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        print(json.dumps(run(args.method, args.concept, args.every, args.n, args.max_classic_steps)))
        return
    from esd_lora.io import atomic_write_text

    rows = []
    for method in ("esd-lora", "classic"):
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--method", method], check=True,
                              stdout=subprocess.PIPE, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    atomic_write_text(ROOT / "benchmarks" / "TIME_TO_ERASURE.md", report(rows, sys.argv[1:]))
    print(report(rows, sys.argv[1:]))


if __name__ == "__main__":
    main()
