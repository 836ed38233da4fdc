"""Every toy concept erased with its kind's recipe, untuned, and measured on held-out prompts.

    python benchmarks/all_concepts.py [--concepts red star ...] [--n 32] [--set key=value ...]
    python benchmarks/all_concepts.py --concepts red orange --compare WORK [WORK ...]

For each of the 20 concepts of the toy world, `esd-lora train recipes/toy/<kind>.yaml` with only the concept
given (`concept.prompts=[name, synonym, synonym]`), then, with the same seeds for the base and the erased
model (`n` images per prompt, the toy classifier):
- efficacy: the concept's held-out prompts, one per caption template (8), said with its name and both
  synonyms in turn, the words of the other kinds drawn at random (none of them a prompt the recipe trains);
- specificity: each other concept of the same kind on two of its own held-out prompts, and the other
  kinds' concepts named inside the efficacy prompts ("a photo of a scarlet polka star": dotted and star),
  each as a fraction of the base model's rate on the same prompt.
The base model's rates are computed once for every prompt and cached, as is every finished run, in
build/all_concepts/ (--fresh redoes them). `--set` passes recipe overrides to every training (tried
variants go to their own folder, `--work`). The table goes to benchmarks/ALL_CONCEPTS.md after each concept.
`--compare` trains nothing: it puts the cached runs of several work folders (variants, seeds) side by side.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esd_lora.evaluate import detection_rates, summarize  # noqa: E402
from esd_lora.io import atomic_write_text  # noqa: E402
from esd_lora.toy.scoring import ToyScorer, contexts  # noqa: E402
from esd_lora.toy.vocab import CONCEPTS, KINDS, TEMPLATES, article, kind_of  # noqa: E402

SPECIFICITY_PROMPTS = 2  # held-out prompts per other concept of the kind
SEED = 0
SHIPPED = {"red": "red", "blue": "blue", "star": "star", "striped": "striped"}  # adapters/<name>: its concept
BASE_CACHE = ROOT / "build" / "all_concepts"


def recipe_of(concept: str) -> str:
    return f"recipes/toy/{kind_of(concept)}.yaml"


def trained_prompts(kind: str) -> set[str]:
    """Every prompt a recipe of this kind trains on, whichever concept it erases: every word of the kind in each
    of the recipe's contexts (the erased concept's words, and the rest as preserve prompts)."""
    from esd_lora.recipe import load_recipe

    concept = load_recipe(f"{ROOT}/recipes/toy/{kind}.yaml").concept
    concept.prompts = [w for c, syn in KINDS[kind].items() for w in (c, *syn)]
    return {p.lower() for p in concept.trained().prompts}


def held_out(concept: str) -> list[str]:
    """One prompt per caption template, the concept said by its name and its synonyms in turn, the other kinds'
    words drawn (seeded by the concept), never a prompt the kind's recipe trains."""
    rng, exclude = random.Random(f"{SEED}/{concept}"), trained_prompts(kind_of(concept))
    words = [concept, *KINDS[kind_of(concept)][concept]]
    out = []
    for i, template in enumerate(TEMPLATES):
        options = sorted({template.format(a=article(d), d=d) for t, d in contexts(concept)
                          if t == template and words[i % len(words)] in d.split()} - exclude)
        out.append(rng.choice(options))
    return out


def prompts_for(concept: str) -> tuple[list[str], list[str]]:
    """The efficacy prompts, and the specificity prompts of the other concepts of the kind."""
    others = [c for c in KINDS[kind_of(concept)] if c != concept]
    return held_out(concept), [p for c in others for p in held_out(c)[:SPECIFICITY_PROMPTS]]


def esd_lora(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "esd_lora", *args], check=True, cwd=ROOT)


def base_rates(prompts: list[str], n: int, pipe, scorer) -> dict:
    """The base model's rates for the prompts, computed once for every run (cached in BASE_CACHE)."""
    cache = BASE_CACHE / f"base_n{n}.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    rates = json.loads(cache.read_text()) if cache.exists() else {}
    missing = [p for p in dict.fromkeys(prompts) if p not in rates]
    if missing:
        rates.update(detection_rates(pipe, missing, n, SEED, scorer)[0])
        atomic_write_text(cache, json.dumps(rates, indent=1))
    return {p: rates[p] for p in prompts}


def measure(concept: str, adapter: Path, n: int) -> dict:
    """Rates of the concept's held-out and specificity prompts, base against the adapter, and their summaries."""
    from esd_lora.adapter import load_adapters
    from esd_lora.evaluate import rates_with_roles
    from esd_lora.models import load_pipeline

    efficacy, specificity = prompts_for(concept)
    prompts, scorer = efficacy + specificity, ToyScorer()
    pipe = load_pipeline("toy")
    before = base_rates(prompts, n, pipe, scorer)
    load_adapters(pipe, [adapter])
    after = detection_rates(pipe, prompts, n, SEED, scorer)[0]
    rates = rates_with_roles(before, after, [concept], scorer)
    same_kind = [{c: r for c, r in rates[p].items() if c != concept and kind_of(c) == kind_of(concept)} for p in prompts]
    other_kinds = [{c: r for c, r in rates[p].items() if kind_of(c) != kind_of(concept)} for p in prompts]
    return {"concept": concept, "kind": kind_of(concept), "adapter": str(adapter), "n": n,
            "efficacy": summarize({p: rates[p] for p in efficacy}), "same_kind": summarize(dict(enumerate(same_kind))),
            "other_kinds": summarize(dict(enumerate(other_kinds))), "rates": rates}


def run(concept: str, n: int, overrides: list[str], work: Path, fresh: bool) -> dict:
    """Train the concept's erasure with its kind's recipe and measure it (both cached)."""
    out, result_file = work / concept, work / concept / f"result_n{n}.json"
    if result_file.exists() and not fresh:
        return json.loads(result_file.read_text())
    words = [concept, *KINDS[kind_of(concept)][concept]]
    started = time.time()
    esd_lora("train", recipe_of(concept), f"concept.prompts=[{', '.join(words)}]", f"name={concept}", *overrides,
             f"output.dir={out}", "--overwrite", "--quiet")
    result = {"recipe": recipe_of(concept), "overrides": overrides, "train_seconds": round(time.time() - started, 1),
              "train_steps": json.loads((out / "summary.json").read_text())["steps"], **measure(concept, out, n)}
    atomic_write_text(result_file, json.dumps(result, indent=1))
    return result


def cells(r: dict) -> str:
    """Detected, same kind kept and other kinds kept, worst / mean, as table cells."""
    def pct(x) -> str:
        return "–" if x is None else f"{x:.0%}"

    e, s, o = r["efficacy"], r["same_kind"], r["other_kinds"]
    return (f"{pct(e['efficacy_max_detection'])} / {pct(e['efficacy_mean_detection'])} | "
            f"{pct(s['specificity_min_ratio'])} / {pct(s['specificity_mean_ratio'])} | "
            f"{pct(o['specificity_min_ratio'])} / {pct(o['specificity_mean_ratio'])}")


def table(results: list[dict], shipped: dict[str, dict], argv: list[str], note: str = "") -> str:
    n = (results or list(shipped.values()))[0]["n"]
    lines = ["# Every toy concept, erased by its kind's recipe", "",
             f"`python benchmarks/all_concepts.py {shlex.join(argv)}`: each concept erased by `esd-lora train "
             "recipes/toy/<kind>.yaml` with only `concept.prompts` (name and synonyms) and `name` given, then "
             f"measured on held-out prompts, {n} images each, the same seeds for the base and the erased model. "
             "Detected: the concept's share of images over its 8 held-out prompts (every caption template; name and "
             "both synonyms), worst prompt / mean. Kept: each other concept's rate as a share of the base model's, "
             "worst / mean, for the other concepts of the kind (2 held-out prompts each) and for the other kinds' "
             "concepts inside the concept's prompts. Training: `esd-lora train` wall time, start-up included."
             + (f" {note}" if note else ""), ""]
    if results:
        lines += ["| concept | kind | detected (worst / mean) | same kind kept (worst / mean) | "
                  "other kinds kept (worst / mean) | training (s) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['concept']} | {r['kind']} | {cells(r)} | {r['train_seconds']:.0f} |" for r in results]
        worst = [r["efficacy"]["efficacy_max_detection"] for r in results]
        kept = [min(x for x in (r["same_kind"]["specificity_min_ratio"], r["other_kinds"]["specificity_min_ratio"])
                    if x is not None) for r in results]
        lines += ["", f"{len(results)} concepts: detected at most {max(worst):.0%} on any held-out prompt "
                  f"({sum(w <= 0.05 for w in worst)} of {len(results)} at ≤ 5 %); the other concepts kept at "
                  f"≥ {min(kept):.0%} of base ({sum(k >= 0.95 for k in kept)} of {len(results)} concepts keep every "
                  f"other one at ≥ 95 %); training {min(r['train_seconds'] for r in results):.0f}-"
                  f"{max(r['train_seconds'] for r in results):.0f} s.", ""]
    if shipped:
        lines += ["## The shipped adapters on the same prompts", "",
                  "`--shipped`: the adapters in `adapters/`, each measured on its concept's prompts above.", "",
                  "| adapter | recipe | detected (worst / mean) | same kind kept (worst / mean) | "
                  "other kinds kept (worst / mean) |", "|---|---|---|---|---|"]
        lines += [f"| `adapters/{name}` | `recipes/toy/{name}.yaml` | {cells(r)} |" for name, r in shipped.items()]
        lines.append("")
    return "\n".join(lines)


def compare(works: list[Path], concepts: list[str], n: int, argv: list[str], note: str = "") -> str:
    """The cached runs of several work folders side by side, per concept: variants of the kind recipes (each
    folder trained with its own `--set`), or one recipe from several seeds."""
    lines = ["# Variants of the kind recipes, side by side", "",
             f"`python benchmarks/all_concepts.py {shlex.join(argv)}`: the runs cached in each work folder, measured "
             "as in ALL_CONCEPTS.md (held-out prompts, detected worst / mean, kept worst / mean of base). Each row's "
             "overrides are the `--set` it was trained with, on top of the kind's recipe." + (f" {note}" if note else ""),
             "", "| overrides | concept | detected | same kind kept | other kinds kept | training (s) |",
             "|---|---|---|---|---|---|"]
    for work in works:
        for concept in concepts:
            result = work / concept / f"result_n{n}.json"
            if result.exists():
                r = json.loads(result.read_text())
                lines.append(f"| {shlex.join(r['overrides']) or '(none)'} | {concept} | {cells(r)} | "
                             f"{r['train_seconds']:.0f} |")
    return "\n".join(lines + [""])


def measure_shipped(n: int, work: Path, fresh: bool) -> dict[str, dict]:
    """The shipped adapters on their concept's held-out prompts (cached)."""
    out = {}
    for name, concept in SHIPPED.items():
        result_file = work / "shipped" / f"{name}_n{n}.json"
        if fresh or not result_file.exists():
            result_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(result_file, json.dumps(measure(concept, ROOT / "adapters" / name, n), indent=1))
        out[name] = json.loads(result_file.read_text())
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concepts", nargs="*", default=list(CONCEPTS), choices=CONCEPTS)
    parser.add_argument("--shipped", action="store_true", help="also measure the shipped adapters (adapters/)")
    parser.add_argument("--n", type=int, default=32, help="images per prompt")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="recipe overrides for every run")
    parser.add_argument("--work", default=str(ROOT / "build" / "all_concepts"))
    parser.add_argument("--table", help="where the table goes (default benchmarks/ALL_CONCEPTS.md, with --compare "
                        "benchmarks/KIND_RECIPE_VARIANTS.md)")
    parser.add_argument("--compare", nargs="+", metavar="WORK", help="tabulate the cached runs of these work "
                        "folders side by side (no training)")
    parser.add_argument("--fresh", action="store_true", help="retrain and re-measure cached runs")
    parser.add_argument("--note", default="", help="a sentence for the table's header: how the runs were made")
    args = parser.parse_args(argv)
    if "--note" in argv:  # the table's command line without the note itself
        argv = argv[:argv.index("--note")] + argv[argv.index("--note") + 2:]
    args.table = args.table or str(ROOT / "benchmarks" / ("KIND_RECIPE_VARIANTS.md" if args.compare
                                                          else "ALL_CONCEPTS.md"))
    if args.compare:
        text = compare([Path(w) for w in args.compare], args.concepts, args.n, argv, args.note)
        atomic_write_text(Path(args.table), text)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results, shipped = [], {}
    for concept in args.concepts:
        results.append(run(concept, args.n, args.set, work, args.fresh))
        e = results[-1]["efficacy"]
        print(f"{concept}: detected ≤ {e['efficacy_max_detection']:.0%}, same kind kept ≥ "
              f"{results[-1]['same_kind']['specificity_min_ratio']:.0%}, other kinds kept ≥ "
              f"{results[-1]['other_kinds']['specificity_min_ratio']:.0%}", flush=True)
        atomic_write_text(Path(args.table), table(results, shipped, argv, args.note))
    if args.shipped:
        shipped = measure_shipped(args.n, work, args.fresh)
        atomic_write_text(Path(args.table), table(results, shipped, argv, args.note))


if __name__ == "__main__":
    main(sys.argv[1:])
