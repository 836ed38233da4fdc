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

from contextlib import contextmanager

import torch

from .models import cat_conditions
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
def adapters_off(unet):
    """The frozen teacher: the same UNet with its LoRA adapters disabled (no second copy in memory)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()
