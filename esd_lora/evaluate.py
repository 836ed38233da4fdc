"""Measure an erasure: how often each named concept still appears, base against erased, same seeds.

A scorer reads the concepts back from the images. It says which concepts a prompt names
(`concepts`), which prompts measure an erasure by default (`default_prompts`) and how often each named
concept appears in a prompt's images (calling it). CLIP (`ClipScorer`, zero-shot: each image goes to the
best-matching label among the erased and kept concepts) scores any model; a named model can bring its
own scorer (the toy world's classifier, see `models.named_models`).
Efficacy is the detection rate of the erased concepts; specificity is each kept concept's rate as a
fraction of the base model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import EsdLoraError
from .sample import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate

GRID_PROMPTS = 24  # rows of the report's image grid (the first prompts: the default ones, then held-out)


class Scorer(Protocol):
    """Reads concepts back from images."""

    name: str

    def concepts(self, prompt: str) -> list[str]: ...

    def default_prompts(self, erased: list[str]) -> list[str]: ...

    def held_out_prompts(self, erased: list[str], trained: list[str], n: int, seed: int) -> list[str]: ...

    def attack_templates(self, concept: str) -> list[str]: ...

    def __call__(self, images, prompt: str) -> dict[str, float]: ...


def model_scorer(model: str) -> Scorer:
    """The scorer a named model brings (the toy classifier for `toy`); other models are scored with CLIP."""
    from .models import named_models

    named = named_models().get(model)
    if named is None or named.scorer is None:
        raise EsdLoraError(f"{model}: this model has no scorer of its own; score it with CLIP (--clip MODEL "
                           "--kept CONCEPT …)")
    return named.scorer()


class ClipScorer:
    """CLIP zero-shot detection: an image shows the label whose text embedding is closest to its own."""

    def __init__(self, model: str, labels: list[str]) -> None:
        from transformers import CLIPModel, CLIPProcessor

        from .errors import ModelLoadError, reason

        if len(labels) < 2:
            raise EsdLoraError("--kept: CLIP scoring needs alternatives; name the kept concepts too")
        self.labels, self.name = labels, f"clip:{model}"
        try:
            self.model = CLIPModel.from_pretrained(model).eval()
            self.processor = CLIPProcessor.from_pretrained(model)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load CLIP model {model!r}: {reason(err)}") from None
        import torch

        with torch.no_grad():
            text = self.processor(text=labels, return_tensors="pt", padding=True)
            self.text = torch.nn.functional.normalize(self._features(self.model.get_text_features(**text)), dim=-1)

    @staticmethod
    def _features(out):
        """Projected features: transformers 4 returns them as a tensor, 5 as an output's pooler_output."""
        import torch

        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def concepts(self, prompt: str) -> list[str]:
        return [label for label in self.labels if label.lower() in prompt.lower()]

    def default_prompts(self, erased: list[str]) -> list[str]:
        """The labels themselves: the erased concepts, then the kept ones."""
        return list(self.labels)

    def held_out_prompts(self, erased: list[str], trained: list[str], n: int, seed: int) -> list[str]:
        """None: held-out prompts for a real model come from a prompt file (--prompts)."""
        return []

    def attack_templates(self, concept: str) -> list[str]:
        """Where an attack's tokens stand for the concept, in a few generic captions."""
        return ["{}", "a photo of {}", "a painting of {}", "an image of {}", "a picture of {}", "{}, high quality",
                "a drawing of {}", "a close-up of {}"]

    def __call__(self, images, prompt: str) -> dict[str, float]:
        import torch

        named = self.concepts(prompt)
        with torch.no_grad():
            pixels = self.processor(images=list((images.clamp(-1, 1) + 1) / 2), return_tensors="pt",
                                    do_rescale=False).pixel_values
            image = torch.nn.functional.normalize(self._features(self.model.get_image_features(pixel_values=pixels)),
                                                  dim=-1)
        best = (image @ self.text.T).argmax(dim=-1)
        return {label: float((best == self.labels.index(label)).float().mean()) for label in named}


def detection_rates(pipe, prompts: list[str], n: int, seed: int, scorer, steps: int = DEFAULT_STEPS,
                    guidance: float = DEFAULT_GUIDANCE, progress: bool = True) -> tuple[dict, "object"]:
    """Per prompt, the rate of each named concept over n seeded images; also returns the images."""
    seeds = list(range(seed, seed + n))
    images = generate(pipe, [p for p in prompts for _ in seeds], seeds * len(prompts), steps, guidance,
                      progress=progress)
    return {p: scorer(images[i * n:(i + 1) * n], p) for i, p in enumerate(prompts)}, images


def is_erased(concept: str, prompt: str, erased: list[str], named: list[str], erased_from: list[str] = ()) -> bool:
    """Whether the concept should be gone from this prompt's images: it is erased and, for an erasure
    from given subjects only (`erase_from`), the prompt names one of them (`named`: the concepts the scorer
    reads in the prompt)."""
    if concept not in erased:
        return False
    return not erased_from or any(s in named or s.lower() in prompt.lower() for s in erased_from)


def summarize(prompts: dict) -> dict:
    """Efficacy (worst erased-concept rate after) and specificity (worst kept-concept ratio to base), from a
    report's per-prompt rates and roles."""
    rows = [r for rates in prompts.values() for r in rates.values()]
    erased_rates = [r["erased"] for r in rows if r["role"] == "erased"]
    kept_ratios = [r["erased"] / r["base"] for r in rows if r["role"] == "kept" and r["base"] > 0]
    return {
        "efficacy_max_detection": max(erased_rates) if erased_rates else None,
        "efficacy_mean_detection": float(np.mean(erased_rates)) if erased_rates else None,
        "specificity_min_ratio": min(kept_ratios) if kept_ratios else None,
        "specificity_mean_ratio": float(np.mean(kept_ratios)) if kept_ratios else None,
    }


def rates_with_roles(before: dict, after: dict, erased: list[str], scorer: Scorer,
                     erased_from: list[str] = ()) -> dict:
    """Per prompt and concept: base rate, erased rate and role (`erased` or `kept`)."""
    return {p: {c: {"base": before[p][c], "erased": after[p][c],
                    "role": "erased" if is_erased(c, p, erased, scorer.concepts(p), erased_from) else "kept"}
                for c in before[p]} for p in before}


def trained_prompts(adapters: list[str], erased_model: str | None) -> list[str]:
    """The prompts the erasure was trained on (erased and preserved), from the adapters or the merged model's
    header."""
    from .adapter import adapter_provenance, preserve_prompts
    from .provenance import UNET_WEIGHTS, MergedProvenance, read_metadata

    prompts = []
    for path in adapters:
        record = adapter_provenance(path)
        prompts += [*record.concepts, *preserve_prompts(path, record)]
    weights = Path(erased_model or "") / "unet" / UNET_WEIGHTS
    if erased_model and weights.is_file():
        merged = MergedProvenance.from_metadata(read_metadata(weights), weights)
        prompts += [p for group in merged.erased for p in group]
    return list(dict.fromkeys(prompts))


def evaluate(model: str, adapters: list[str], erased: list[str], scorer: Scorer, prompts: list[str] | None = None,
             n: int = 64, seed: int = 0, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
             progress: bool = True, erased_model: str | None = None, erased_from: list[str] = (),
             held_out: int = 24) -> tuple[dict, "object"]:
    """Detection rates of `model` against `erased_model` (default: the same model) with the adapters loaded,
    and the summaries; returns (report, grid image). A merged model is measured with `erased_model`. With
    `erased_from` (subject concepts), the erased concepts count as erased only in prompts naming a subject.

    Prompts the erasure was trained on are reported apart from held-out ones. Without `prompts`, the
    scorer's default prompts are measured, plus `held_out` held-out prompts per erased concept where the
    scorer can make them (the toy world's); given prompts that were trained on are flagged on stderr."""
    import sys

    import torch

    from .adapter import load_adapters
    from .models import load_pipeline
    from .sample import to_pil_grid

    trained = trained_prompts(adapters, erased_model)  # a missing or unreadable adapter fails here, first
    if prompts is None:
        prompts = scorer.default_prompts(erased)
        prompts += [p for p in scorer.held_out_prompts(erased, trained, held_out, seed) if p not in prompts]
    elif overlap := [p for p in prompts if p.lower() in {t.lower() for t in trained}]:
        print(f"warning: {len(overlap)} of the prompts were trained on ({overlap[0]!r}…); they are reported as "
              "trained, apart from the held-out ones", file=sys.stderr)
    pipe = load_pipeline(model)
    before, base_images = detection_rates(pipe, prompts, n, seed, scorer, steps, guidance, progress)
    if erased_model:
        pipe = load_pipeline(erased_model)
    load_adapters(pipe, adapters)
    after, erased_images = detection_rates(pipe, prompts, n, seed, scorer, steps, guidance, progress)
    shown, rows = min(n, 4), []
    for i in range(min(len(prompts), GRID_PROMPTS)):
        rows += [base_images[i * n:i * n + shown], erased_images[i * n:i * n + shown]]
    rates = rates_with_roles(before, after, erased, scorer, erased_from)
    sets = {"trained": [p for p in prompts if p.lower() in {t.lower() for t in trained}]}
    sets["held_out"] = [p for p in prompts if p not in sets["trained"]]
    report = {
        "model": model, "erased_model": erased_model or model, "adapters": [str(a) for a in adapters],
        "erased": erased, "erased_from": list(erased_from),
        "settings": {"n": n, "seed": seed, "steps": steps, "guidance": guidance,
                     "scheduler": type(pipe.scheduler).__name__, "scorer": scorer.name},
        "prompts": rates, "sets": sets, "summary": summarize(rates),
        "summary_trained": summarize({p: rates[p] for p in sets["trained"]}),
        "summary_held_out": summarize({p: rates[p] for p in sets["held_out"]}),
    }
    return report, to_pil_grid(torch.cat(rows), cols=2 * shown, scale=3)


def format_report(report: dict) -> str:
    """The report as Markdown."""
    s = report["settings"]
    lines = ["# Erasure report", "", f"Base `{report['model']}`, erased model `{report['erased_model']}`, adapters: "
             + (", ".join(f"`{a}`" for a in report["adapters"]) or "none")
             + f". Erased: {', '.join(report['erased'])}"
             + (f" (from {', '.join(report['erased_from'])} only)." if report["erased_from"] else "."),
             f"{s['n']} images per prompt, seeds {s['seed']}..{s['seed'] + s['n'] - 1}, {s['steps']} steps of "
             f"{s['scheduler']}, guidance {s['guidance']}, scored by {s['scorer']}.", "",
             "| prompt | set | concept | base | erased | |", "|---|---|---|---|---|---|"]
    held_out = set(report["sets"]["held_out"])
    for prompt, rates in report["prompts"].items():
        for concept, r in rates.items():
            where = "held-out" if prompt in held_out else "trained"
            lines.append(f"| {prompt} | {where} | {concept} | {r['base']:.0%} | {r['erased']:.0%} | {r['role']} |")
    lines.append("")
    counts = {"summary": len(report["prompts"]), "summary_trained": len(report["sets"]["trained"]),
              "summary_held_out": len(report["sets"]["held_out"])}
    for name, key in (("All prompts", "summary"), ("Trained prompts", "summary_trained"),
                      ("Held-out prompts", "summary_held_out")):
        sm, parts = report[key], []
        if sm["efficacy_max_detection"] is not None:
            parts.append(f"erased concepts detected in at most {sm['efficacy_max_detection']:.0%} "
                         f"(mean {sm['efficacy_mean_detection']:.0%}) of images")
        if sm["specificity_min_ratio"] is not None:
            parts.append(f"kept concepts keep at least {sm['specificity_min_ratio']:.0%} of their base detection "
                         f"rate (mean {sm['specificity_mean_ratio']:.0%})")
        lines.append(f"{name} ({counts[key]}): " + ("; ".join(parts) or "nothing measured") + ".")
    return "\n".join(lines) + "\n"
