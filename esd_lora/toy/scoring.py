"""How `esd-lora eval` reads the toy world: the toy classifier detects each concept a prompt names."""

from __future__ import annotations

import numpy as np
import torch

from .vocab import KINDS, concept_prompt, kind_of, named_concepts


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

    def __call__(self, images: torch.Tensor, prompt: str) -> dict[str, float]:
        predicted = self.classifier.predict(images)
        return {c: float(np.mean([p == c for p in predicted[kind_of(c)]])) for c in named_concepts(prompt)}
