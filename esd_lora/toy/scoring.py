"""How `esd-lora eval` reads the toy world: the toy classifier detects each concept a prompt names."""

from __future__ import annotations

import random

import numpy as np
import torch

from .vocab import COLOURS, KINDS, SHAPES, TEMPLATES, article, concept_prompt, kind_of, named_concepts


def contexts(concept: str) -> list[tuple[str, str]]:
    """Every (template, description) pair that says `concept` (by name or synonym) in a caption template,
    with every word of the other kinds around it (or none), in the order colour, texture, shape."""
    kind = kind_of(concept)
    others = {k: [None, *(w for c, syn in table.items() for w in (c, *syn))] for k, table in KINDS.items() if k != kind}
    words = {kind: [w for w in (concept, *KINDS[kind][concept])]}
    out = []
    for colour in words.get("colour") or others["colour"]:
        for texture in words.get("texture") or others["texture"]:
            for shape in words.get("shape") or others["shape"]:
                desc = " ".join(w for w in (colour, texture, shape or "shape") if w)
                out += [(template, desc) for template in TEMPLATES]
    return out


def context_prompts(concept: str, n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[str]:
    """A seeded sample of n prompts saying the concept in contexts (see `contexts`), none of `exclude`."""
    prompts = sorted({t.format(a=article(d), d=d) for t, d in contexts(concept)} - exclude)
    return rng.sample(prompts, min(n, len(prompts)))


def concept_renders(concept: str, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n renders (seeded) showing the concept, its other attributes random, what an attacker would draw, and
    the caption of each with `{}` for the concept, in the form of `ToyScorer.attack_templates`."""
    from .render import random_scene, render_batch, to_tensor

    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, **{kind_of(concept): concept}) for _ in range(n)]
    texts = [f"a {s.colour} {{}}" if kind_of(concept) == "shape" else f"a {{}} {s.shape}" for s in scenes]
    return to_tensor(render_batch(scenes)), texts


class ToyScorer:
    """Detection rates of the toy concepts a prompt names (by name or synonym), read by the toy classifier."""

    name = "toy-classifier"

    def __init__(self, classifier=None) -> None:
        from .classifier import load_classifier

        self.classifier = classifier or load_classifier()

    def concepts(self, prompt: str) -> list[str]:
        return named_concepts(prompt)

    def default_prompts(self, erased: list[str]) -> list[str]:
        """Each erased concept by name and by every synonym, then every other concept of the same kinds."""
        prompts = []
        for concept in erased:
            prompts += [concept_prompt(w, concept) for w in (concept, *KINDS[kind_of(concept)][concept])]
        for kind in dict.fromkeys(kind_of(c) for c in erased):
            prompts += [concept_prompt(c, c) for c in KINDS[kind] if c not in erased]
        return prompts

    def held_out_prompts(self, erased: list[str], trained: list[str], n: int, seed: int) -> list[str]:
        """Prompts no adapter was trained on: n per erased concept and n // 4 per other concept of its kind,
        each a caption template with the concept's name or a synonym and other kinds' words around it."""
        rng, exclude = random.Random(seed), {p.lower() for p in trained}
        if n == 0:
            return []
        prompts = []
        for concept in erased:
            prompts += context_prompts(concept, n, rng, exclude)
        for kind in dict.fromkeys(kind_of(c) for c in erased):
            for concept in KINDS[kind]:
                if concept not in erased:
                    prompts += context_prompts(concept, max(1, n // 4), rng, exclude)
        return prompts

    def attack_templates(self, concept: str) -> list[str]:
        """Where an attack's tokens stand for the concept: beside each shape (a colour or texture), or after
        each colour (a shape): "a {} circle" ... "a {} diamond"."""
        if kind_of(concept) == "shape":
            return [f"a {c} {{}}" for c in COLOURS]
        return [f"a {{}} {s}" for s in SHAPES]

    def __call__(self, images: torch.Tensor, prompt: str) -> dict[str, float]:
        predicted = self.classifier.predict(images)
        return {c: float(np.mean([p == c for p in predicted[kind_of(c)]])) for c in named_concepts(prompt)}
