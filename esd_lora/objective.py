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


def esd_target(anchor: torch.Tensor, concept: torch.Tensor, empty: torch.Tensor, eta: float) -> torch.Tensor:
    """The negatively guided prediction the trained model should make."""
    return anchor - eta * (concept - empty)


def esd_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error, computed in fp32 whatever the autocast dtype."""
    return torch.nn.functional.mse_loss(prediction.float(), target.float())


@contextmanager
def adapters_off(unet):
    """The frozen teacher: the same UNet with its LoRA adapters disabled (no second copy in memory)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()
