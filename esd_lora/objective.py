"""ESD's objective (Gandikota et al., ICCV 2023, Eq. 6), in the paper's convention:

    target = eps*(x_t, neutral) - eta * (eps*(x_t, c) - eps*(x_t, neutral))
    loss   = MSE(eps_theta(x_t, c), target)

eps* is the frozen model, here the same UNet with its adapter disabled. The neutral prompt is the empty
one, as in the paper; `erase_from` puts the subject s there ("a circle" for c = "a red circle"), so the
guidance is away from what c adds to s, and only where s is named.
The target's coefficients sum to one, so it is the same combination whatever the model predicts
(epsilon or v): on a v-prediction model the target is built from v-predictions and means the same.
"""

from __future__ import annotations

import random
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .latents import LatentBatch
from .models import cat_conditions
from .recipe import ConceptSection
from .sampler import unet_eps


def esd_target(concept: torch.Tensor, neutral: torch.Tensor, eta: float) -> torch.Tensor:
    """The negatively guided prediction the trained model should make."""
    return neutral - eta * (concept - neutral)


def esd_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, computed in fp32 whatever the autocast dtype."""
    return torch.nn.functional.mse_loss(prediction.float(), target.float())


def predictions(unet, scheduler, latents: list[torch.Tensor], t: torch.Tensor,
                conds: list[dict]) -> list[torch.Tensor]:
    """The model's predictions on each latent batch with its condition batch, in one UNet call, as fp32."""
    n = len(conds)
    preds = unet_eps(unet, scheduler, torch.cat(latents), t.repeat(n), cat_conditions(conds))
    return list(preds.float().chunk(n))


@torch.no_grad()
def frozen_predictions(frozen, scheduler, latents: list[torch.Tensor], t: torch.Tensor,
                       conds: list[dict]) -> list[torch.Tensor]:
    """predictions() of the frozen teacher, without gradient."""
    return predictions(frozen, scheduler, latents, t, conds)


@contextmanager
def adapters_off(unet, text_encoder=None):
    """The frozen teacher: the same UNet (and text encoder, when it is adapted too) with its LoRA adapters
    disabled (no second copy in memory); yields the UNet."""
    from diffusers.utils.peft_utils import set_adapter_layers

    models = [m for m in (unet, text_encoder) if m is not None]
    for model in models:
        set_adapter_layers(model, enabled=False)
    try:
        yield unet
    finally:
        for model in models:
            set_adapter_layers(model, enabled=True)


@dataclass
class EsdStep:
    """One ESD update's loss on a batch of latents: the teacher's predictions for the concept and the
    neutral prompt give the target, and the trained model's prediction for the concept is pulled to it.
    Preserve prompts add a loss that keeps the trained model's predictions on them equal to the teacher's,
    on the concept's latents, on latents sampled from the preserve prompts (preserve_on own), or on both."""

    concept: ConceptSection
    conditioner: Callable[[list[str]], dict]  # prompts -> UNet keyword arguments (models.Conditioner)
    scheduler: Any
    batch: int

    def batches(self, latents: LatentBatch, rng: random.Random) -> tuple[list[torch.Tensor], list[list[str]]]:
        """Latent and prompt batches: the concept, its neutral prompt, then (if any) the preserve prompts."""
        c, b = self.concept, self.batch
        x_t, picks = latents.x[:b], latents.picks[:b]
        neutral = [c.subject(i) for i in picks] if c.erase_from else [""] * b
        xs, prompts = [x_t, x_t], [[c.prompts[i] for i in picks], neutral]
        if c.preserve and c.preserve_on in ("own", "both"):
            xs.append(latents.x[b:])
            prompts.append([c.preserve[j] for j in latents.picks[b:]])
        if c.preserve and c.preserve_on in ("erased", "both"):
            xs.append(x_t)
            prompts.append([c.preserve[rng.randrange(len(c.preserve))] for _ in range(b)])
        return xs, prompts

    def loss(self, student, teacher: Callable[[], AbstractContextManager], latents: LatentBatch, t: torch.Tensor,
             rng: random.Random, autocast: Callable[[], AbstractContextManager], adversarial: list[dict] = (),
             adversarial_weight: float = 1.0, adversarial_frozen: list[dict] = (),
             adversarial_eta: float | None = None) -> torch.Tensor:
        """The step's loss. `adversarial` (robust erasure): condition batches of attackers' prompts, whose
        predictions on the concept's latents are pulled to the concept's target as well (with
        `adversarial_eta` in place of the concept's eta when given); with `adversarial_frozen`, the same prompts
        as the teacher conditions them (attack.target attacker), each to the teacher's prediction under it less
        1 + eta times what the concept adds to its neutral prompt."""
        xs, prompts = self.batches(latents, rng)
        with teacher() as frozen, torch.no_grad():
            preds = frozen_predictions(frozen, self.scheduler, xs + [xs[0]] * len(adversarial_frozen), t,
                                       [self.conditioner(p) for p in prompts] + list(adversarial_frozen))
        target = esd_target(preds[0], preds[1], self.concept.eta)
        eta = self.concept.eta if adversarial_eta is None else adversarial_eta
        if adversarial_frozen:
            erased = (1 + eta) * (preds[0] - preds[1])  # what the concept adds, scaled as in the target
            adversarial_targets = [p - erased for p in preds[len(xs):]]
        else:
            adversarial_target = target if eta == self.concept.eta else esd_target(preds[0], preds[1], eta)
            adversarial_targets = [adversarial_target] * len(adversarial)
        rows = [0, *range(2, len(xs))]  # the concept's and the preserve prompts' predictions
        # the student's conditions: through the text encoder's adapter when it has one (else the same, cached)
        student_xs, student_conds = [xs[i] for i in rows], [self.conditioner(prompts[i]) for i in rows]
        student_xs += [xs[0]] * len(adversarial)
        student_conds += adversarial
        with autocast():
            eps = predictions(student, self.scheduler, student_xs, t, student_conds)
            loss = esd_loss(eps[0], target)
            for kept, frozen_kept in zip(eps[1:len(rows)], preds[2:len(xs)]):
                loss = loss + self.concept.preserve_weight * esd_loss(kept, frozen_kept)
            for pred, adversarial_target in zip(eps[len(rows):], adversarial_targets):
                loss = loss + adversarial_weight * esd_loss(pred, adversarial_target)
        return loss
