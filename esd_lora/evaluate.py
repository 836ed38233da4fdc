"""Measure an erasure: how often each named concept still appears, base against erased, same seeds.

On the toy model the toy classifier reads the images, and a prompt is scored on every toy concept it
names (by name or synonym). On real models CLIP does, zero-shot: each image goes to the best-matching
label among the erased and kept concepts, and a prompt is scored on every label it contains.
Efficacy is the detection rate of the erased concepts; specificity is each kept concept's rate as a
fraction of the base model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sample import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate
from .toy.vocab import KINDS, WORD_TO_CONCEPT, kind_of


def named_concepts(prompt: str) -> list[str]:
    """Toy concepts a prompt names, by name or synonym."""
    found = []
    for word in prompt.lower().replace(",", " ").split():
        if word in WORD_TO_CONCEPT and WORD_TO_CONCEPT[word] not in found:
            found.append(WORD_TO_CONCEPT[word])
    return found


def default_prompts(erased: list[str]) -> list[str]:
    """Each erased concept by name and by every synonym, then every other concept of the same kinds."""
    from .toy.quality import concept_prompt

    prompts = []
    for concept in erased:
        prompts += [concept_prompt(w, concept) for w in (concept, *KINDS[kind_of(concept)][concept])]
    for kind in dict.fromkeys(kind_of(c) for c in erased):
        prompts += [concept_prompt(c, c) for c in KINDS[kind] if c not in erased]
    return prompts


@dataclass
class Scorer:
    """Toy-classifier detection rates of the concepts each prompt names."""

    classifier: object

    def __call__(self, images, prompt: str) -> dict[str, float]:
        predicted = self.classifier.predict(images)
        return {c: float(np.mean([p == c for p in predicted[kind_of(c)]])) for c in named_concepts(prompt)}


class ClipScorer:
    """CLIP zero-shot detection: an image shows the label whose text embedding is closest to its own."""

    def __init__(self, model: str, labels: list[str]) -> None:
        from transformers import CLIPModel, CLIPProcessor

        from .models import ModelLoadError

        if len(labels) < 2:
            raise ValueError("CLIP scoring needs alternatives: name the kept concepts too (--kept)")
        self.labels = labels
        try:
            self.model = CLIPModel.from_pretrained(model).eval()
            self.processor = CLIPProcessor.from_pretrained(model)
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelLoadError(f"cannot load CLIP model {model!r}: {first}") from None
        import torch

        with torch.no_grad():
            text = self.processor(text=labels, return_tensors="pt", padding=True)
            self.text = torch.nn.functional.normalize(self._features(self.model.get_text_features(**text)), dim=-1)

    @staticmethod
    def _features(out):
        """Projected features: transformers 4 returns them as a tensor, 5 as an output's pooler_output."""
        import torch

        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def __call__(self, images, prompt: str) -> dict[str, float]:
        import torch

        named = [label for label in self.labels if label.lower() in prompt.lower()]
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


def is_erased(concept: str, prompt: str, erased: list[str], erased_from: list[str] = ()) -> bool:
    """Whether the concept should be gone from this prompt's images: it is erased and, for an erasure
    from given subjects only (`erase_from`), the prompt names one of them."""
    if concept not in erased:
        return False
    return not erased_from or any(s in named_concepts(prompt) or s.lower() in prompt.lower() for s in erased_from)


def summarize(before: dict, after: dict, erased: list[str], erased_from: list[str] = ()) -> dict:
    """Efficacy (worst erased-concept rate after) and specificity (worst kept-concept ratio to base)."""
    erased_rates, kept_ratios = [], []
    for prompt, rates in after.items():
        for concept, rate in rates.items():
            if is_erased(concept, prompt, erased, erased_from):
                erased_rates.append(rate)
            elif before[prompt][concept] > 0:
                kept_ratios.append(rate / before[prompt][concept])
    return {
        "efficacy_max_detection": max(erased_rates) if erased_rates else None,
        "efficacy_mean_detection": float(np.mean(erased_rates)) if erased_rates else None,
        "specificity_min_ratio": min(kept_ratios) if kept_ratios else None,
        "specificity_mean_ratio": float(np.mean(kept_ratios)) if kept_ratios else None,
    }


def evaluate(model: str, adapters: list[str], erased: list[str], prompts: list[str] | None = None, n: int = 64,
             seed: int = 0, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
             progress: bool = True, erased_model: str | None = None, clip: str | None = None,
             kept: list[str] = (), erased_from: list[str] = ()) -> tuple[dict, "object"]:
    """Detection rates of `model` against `erased_model` (default: the same model) with the adapters loaded,
    and the summary; returns (report, grid image). A merged model is measured with `erased_model`.

    With `clip` (a CLIP folder or hub id) CLIP scores the images against the labels erased + kept, and
    the default prompts are the labels themselves; without it the toy classifier does. With `erased_from`
    (subject concepts), the erased concepts count as erased only in prompts naming a subject."""
    import torch

    from .adapter import adapter_file, load_adapters
    from .models import load_pipeline
    from .sample import to_pil_grid
    from .toy.classifier import load_classifier

    for path in adapters:
        adapter_file(path)  # a missing adapter fails before any image is made
    if clip:
        scorer = ClipScorer(clip, list(dict.fromkeys([*erased, *kept])))
        prompts = prompts or scorer.labels
    else:
        for concept in erased:
            kind_of(concept)  # unknown concepts fail here, before any image is made
        scorer = Scorer(load_classifier())
        prompts = prompts or default_prompts(erased)
    pipe = load_pipeline(model)
    before, base_images = detection_rates(pipe, prompts, n, seed, scorer, steps, guidance, progress)
    if erased_model:
        pipe = load_pipeline(erased_model)
    load_adapters(pipe, adapters)
    after, erased_images = detection_rates(pipe, prompts, n, seed, scorer, steps, guidance, progress)
    shown = min(n, 4)
    rows = []
    for i in range(len(prompts)):
        rows += [base_images[i * n:i * n + shown], erased_images[i * n:i * n + shown]]
    grid = to_pil_grid(torch.cat(rows), cols=2 * shown, scale=3)
    report = {
        "model": model, "erased_model": erased_model or model, "adapters": [str(a) for a in adapters],
        "erased": erased, "erased_from": list(erased_from),
        "settings": {"n": n, "seed": seed, "steps": steps, "guidance": guidance, "scheduler": type(pipe.scheduler).__name__,
                     "scorer": f"clip:{clip}" if clip else "toy-classifier"},
        "prompts": {p: {c: {"base": before[p][c], "erased": after[p][c]} for c in before[p]} for p in prompts},
        "summary": summarize(before, after, erased, erased_from),
    }
    return report, grid


def format_report(report: dict) -> str:
    """The report as Markdown."""
    s = report["settings"]
    lines = ["# Erasure report", "", f"Base `{report['model']}`, erased model `{report['erased_model']}`, adapters: "
             + (", ".join(f"`{a}`" for a in report["adapters"]) or "none")
             + f". Erased: {', '.join(report['erased'])}"
             + (f" (from {', '.join(report['erased_from'])} only)." if report["erased_from"] else "."),
             f"{s['n']} images per prompt, seeds {s['seed']}..{s['seed'] + s['n'] - 1}, {s['steps']} steps of {s['scheduler']}, "
             f"guidance {s['guidance']}, scored by {s['scorer']}.", "",
             "| prompt | concept | base | erased | |", "|---|---|---|---|---|"]
    for prompt, rates in report["prompts"].items():
        for concept, r in rates.items():
            role = "erased" if is_erased(concept, prompt, report["erased"], report["erased_from"]) else "kept"
            lines.append(f"| {prompt} | {concept} | {r['base']:.0%} | {r['erased']:.0%} | {role} |")
    sm = report["summary"]
    lines += [""]
    if sm["efficacy_max_detection"] is not None:
        lines.append(f"Efficacy: erased concepts detected in at most {sm['efficacy_max_detection']:.0%} "
                     f"(mean {sm['efficacy_mean_detection']:.0%}) of images.")
    if sm["specificity_min_ratio"] is not None:
        lines.append(f"Specificity: kept concepts keep at least {sm['specificity_min_ratio']:.0%} of their base "
                     f"detection rate (mean {sm['specificity_mean_ratio']:.0%}).")
    return "\n".join(lines) + "\n"
