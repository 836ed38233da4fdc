"""The toy model's quality bar: does each prompt's concept appear in what the model draws?"""

from __future__ import annotations

from pathlib import Path

from ..sample import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate
from .vocab import COLOURS, KINDS, SHAPES, TEXTURES, article, concept_prompt


def triple_prompts() -> list[tuple[str, dict[str, str]]]:
    """16 three-attribute prompts covering every colour, shape and texture twice or more."""
    colours, shapes, textures = list(COLOURS), list(SHAPES), list(TEXTURES)
    out = []
    for i in range(16):
        c, s, t = colours[i % 8], shapes[(3 * i + 1) % 8], textures[(i + i // 8) % 4]
        desc = f"{c} {t} {s}"
        out.append((f"{article(desc)} {desc}", {"colour": c, "shape": s, "texture": t}))
    return out


def quality_table(model: str | Path = "toy", classifier_path: str | Path | None = None, n: int = 32,
                  seed: int = 0, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE) -> dict:
    """Detection rates for every concept by name and by synonym, for three-attribute prompts, and
    the colours and shapes the unconditional model produces."""
    from ..evaluate import detection_rates
    from ..models import load_pipeline
    from .classifier import load_classifier
    from .scoring import ToyScorer

    pipe = load_pipeline(str(model))
    classifier = load_classifier(classifier_path)
    jobs = [(concept, w, concept_prompt(w, concept))
            for table in KINDS.values() for concept, synonyms in table.items() for w in (concept, *synonyms)]
    triples = triple_prompts()
    rates, _ = detection_rates(pipe, [p for _, _, p in jobs] + [p for p, _ in triples], n, seed,
                               ToyScorer(classifier), steps, guidance)
    single: dict[str, dict[str, float]] = {}
    for concept, word, prompt in jobs:
        single.setdefault(concept, {})[word] = rates[prompt][concept]
    triple = {prompt: {kind: rates[prompt][c] for kind, c in attrs.items()} for prompt, attrs in triples}
    # more unconditional draws, so that all 8 colours and 8 shapes can show up
    uncond = generate(pipe, [""] * (4 * n), list(range(seed, seed + 4 * n)), steps, guidance)
    predicted = classifier.predict(uncond)
    unconditional = {kind: sorted(set(predicted[kind])) for kind in KINDS}
    return {
        "settings": {"n": n, "seed": seed, "steps": steps, "guidance": guidance,
                     "scheduler": type(pipe.scheduler).__name__},
        "single": single,
        "triple": triple,
        "unconditional": unconditional,
        "min_single": min(min(v.values()) for v in single.values()),
        "min_triple": min(min(v.values()) for v in triple.values()),
        "unconditional_covers_all": all(
            set(unconditional[k]) == set(t) for k, t in (("colour", COLOURS), ("shape", SHAPES))
        ),
    }


def format_table(table: dict) -> str:
    """The quality table as Markdown, for people and for the README."""
    s = table["settings"]
    lines = [f"Detection rates, {s['n']} images per prompt, seeds {s['seed']}..{s['seed'] + s['n'] - 1}, "
             f"{s['steps']} steps of {s['scheduler']}, guidance {s['guidance']}.", "",
             "| concept | by name | synonym 1 | synonym 2 |", "|---|---|---|---|"]
    for concept, rates in table["single"].items():
        words = list(rates)
        cells = [f"{rates[w]:.0%}" if i == 0 else f"{w}: {rates[w]:.0%}" for i, w in enumerate(words)]
        lines.append(f"| {concept} | " + " | ".join(cells) + " |")
    lines += ["", "| three-attribute prompt | colour | shape | texture |", "|---|---|---|---|"]
    for prompt, rates in table["triple"].items():
        lines.append(f"| {prompt} | {rates['colour']:.0%} | {rates['shape']:.0%} | {rates['texture']:.0%} |")
    u = table["unconditional"]
    lines += ["", f"Unconditional samples show colours: {', '.join(u['colour'])}; shapes: {', '.join(u['shape'])}; "
                  f"textures: {', '.join(u['texture'])}.",
              f"Lowest single-concept rate {table['min_single']:.0%}; lowest three-attribute rate "
              f"{table['min_triple']:.0%}."]
    return "\n".join(lines)
