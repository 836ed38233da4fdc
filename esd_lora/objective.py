"""ESD's objective (Gandikota et al., ICCV 2023, Eq. 6), in the paper's convention:

    target = eps*(x_t, anchor) - eta * (eps*(x_t, c) - eps*(x_t, empty))
    loss   = MSE(eps_theta(x_t, trained_prompt), target)

eps* is the frozen model, here the same UNet with its adapter disabled. Plain erasure uses the
empty prompt as anchor and c as the trained prompt; `erase_from` uses the subject s for both.
The target's coefficients sum to one, so it is the same combination whatever the model predicts
(epsilon or v): on a v-prediction model the target is built from v-predictions and means the same.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .models import cat_conditions
from .sampler import unet_eps


def esd_target(anchor: torch.Tensor, concept: torch.Tensor, empty: torch.Tensor, eta: float) -> torch.Tensor:
    """The negatively guided prediction the trained model should make."""
    return anchor - eta * (concept - empty)


def esd_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, computed in fp32 whatever the autocast dtype."""
    return torch.nn.functional.mse_loss(prediction.float(), target.float())


def predictions(unet, scheduler, x_t: torch.Tensor, t: torch.Tensor, conds: list[dict]) -> list[torch.Tensor]:
    """The model's predictions on x_t for each condition batch, in one UNet call, as fp32."""
    n = len(conds)
    preds = unet_eps(unet, scheduler, x_t.repeat(n, 1, 1, 1), t.repeat(n), cat_conditions(conds))
    return list(preds.float().chunk(n))


@torch.no_grad()
def frozen_predictions(frozen, scheduler, x_t: torch.Tensor, t: torch.Tensor, conds: list[dict]) -> list[torch.Tensor]:
    """predictions() of the frozen teacher, without gradient."""
    return predictions(frozen, scheduler, x_t, t, conds)


@contextmanager
def adapters_off(unet):
    """The frozen teacher: the same UNet with its LoRA adapters disabled (no second copy in memory)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()
