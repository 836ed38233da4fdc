"""Four toy erasures (two colours, a shape, a texture) stacked with every strategy, measured.

    python benchmarks/stack_toy.py [--n 32] [--out build/stack_toy]

Uses the shipped adapters in adapters/ (trained by recipes/toy/{red,blue,star,striped}.yaml) for
`sum` and `fuse`, and trains `sequential` and `joint` from the same recipes. For every erased and every
kept concept it reports the detection rate before and after, and writes the table to
benchmarks/STACK_RESULTS.md. A later run with other `--strategies` adds them to the same table (the base
images are not made again).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONCEPTS = ["red", "blue", "star", "striped"]


def main() -> None:
    from esd_lora.evaluate import detection_rates
    from esd_lora.io import atomic_write_json, atomic_write_text
    from esd_lora.models import load_pipeline
    from esd_lora.recipe import load_recipe
    from esd_lora.stack import stack
    from esd_lora.toy.scoring import ToyScorer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="images per prompt")
    ap.add_argument("--out", default="build/stack_toy")
    ap.add_argument("--strategies", nargs="+", default=["sum", "fuse", "sequential", "joint"])
    args = ap.parse_args()
    out = Path(args.out)
    adapters = [ROOT / "adapters" / c for c in CONCEPTS]
    recipes = [load_recipe(ROOT / "recipes" / "toy" / f"{c}.yaml") for c in CONCEPTS]
    scorer = ToyScorer()
    prompts = scorer.default_prompts(CONCEPTS)
    saved = out / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    if results.get("n") != args.n or results.get("prompts") != prompts:  # else: add strategies to that run
        results = {"n": args.n, "concepts": CONCEPTS, "prompts": prompts, "strategies": {}}
        results["base"], _ = detection_rates(load_pipeline("toy"), prompts, args.n, 0, scorer)
    for strategy in args.strategies:
        t0 = time.time()
        trained = strategy in ("sequential", "joint")
        model, _ = stack("toy", strategy, out / strategy, adapters=[] if trained else adapters,
                         recipes=recipes if trained else [])
        seconds = time.time() - t0
        rates, _ = detection_rates(load_pipeline(str(model)), prompts, args.n, 0, scorer)
        results["strategies"][strategy] = {"seconds": round(seconds, 1), "rates": rates}
        atomic_write_json(out / "results.json", results)
        atomic_write_text(ROOT / "benchmarks" / "STACK_RESULTS.md", table(results))
    print(table(results))


def table(results: dict) -> str:
    """Markdown: one row per (prompt, concept), one column per strategy; erased as rates, kept as % of base."""
    import torch

    from esd_lora import __version__

    strategies = list(results["strategies"])
    lines = ["# Stacking four toy erasures", "",
             f"`python benchmarks/stack_toy.py --n {results['n']}` on {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, esd-lora {__version__}. "
             f"Erased: {', '.join(results['concepts'])} (adapters from `recipes/toy/`). {results['n']} images per "
             "prompt, seeds from 0, DDIM 25 steps, guidance 5, scored by the toy classifier.", "",
             "Erased concepts: detection rate (target ≤ 10 %). Kept concepts: detection rate as a fraction of "
             "base (target ≥ 85 %).", "",
             "| prompt | concept | role | base | " + " | ".join(strategies) + " |",
             "|---|---|---|---|" + "---|" * len(strategies)]
    worst = {s: {"erased": 0.0, "kept": 10.0} for s in strategies}
    for prompt, rates in results["base"].items():
        for concept, base in rates.items():
            role = "erased" if concept in results["concepts"] else "kept"
            cells = []
            for s in strategies:
                after = results["strategies"][s]["rates"][prompt][concept]
                if role == "erased":
                    worst[s]["erased"] = max(worst[s]["erased"], after)
                    cells.append(f"{after:.0%}")
                else:
                    ratio = after / base if base else float("nan")
                    worst[s]["kept"] = min(worst[s]["kept"], ratio) if base else worst[s]["kept"]
                    cells.append(f"{ratio:.0%}")
            lines.append(f"| {prompt} | {concept} | {role} | {base:.0%} | " + " | ".join(cells) + " |")
    lines += ["", "| strategy | worst erased detection | worst kept (of base) | build time (s) |", "|---|---|---|---|"]
    for s in strategies:
        lines.append(f"| {s} | {worst[s]['erased']:.0%} | {worst[s]['kept']:.0%} | "
                     f"{results['strategies'][s]['seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
