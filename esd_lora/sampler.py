"""Where ESD's training latents x_t come from: partial guided DDIM sampling of the concept itself.

No training images are used. Step k of a T-step DDIM schedule leaves the latent at DDIM timestep
tau_k; the loss timestep t is then drawn in tau_k's band of width 1000/T (for 1000 training timesteps), so over training every
noise level from pure noise to clean is covered.
"""

from __future__ import annotations

import torch

from .models import cat_conditions


def unet_eps(unet, scheduler, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """One UNet prediction, always through the scheduler's scale_model_input (the identity for the
    DDIM scheduler used here, but not for Euler-type ones)."""
    return unet(scheduler.scale_model_input(x, t), t, **cond).sample


def ddim_timesteps(scheduler, steps: int) -> torch.Tensor:
    """The descending DDIM timesteps tau_0 > tau_1 > ... of a `steps`-step schedule."""
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.clone()


def loss_timestep(k: int, steps: int, generator: torch.Generator, batch: int,
                  train_timesteps: int = 1000) -> torch.Tensor:
    """DDPM timesteps drawn uniformly in the band of DDIM step k (k=0: the noisiest band)."""
    width = train_timesteps // steps
    low = (steps - 1 - k) * width
    return torch.randint(low, low + width, (batch,), generator=generator)


@torch.no_grad()
def sample_xt(unet, scheduler, cond: dict, uncond: dict, k: int, steps: int, guidance: float,
              generator: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype,
              device: torch.device | str) -> torch.Tensor:
    """Run k guided DDIM steps (eta 0) from Gaussian noise; the concept and empty-prompt halves
    of each step go through the UNet as one batch."""
    timesteps = ddim_timesteps(scheduler, steps)
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
    x = x * scheduler.init_noise_sigma
    both = cat_conditions([cond, uncond])
    n = shape[0]
    for tau in timesteps[:k]:
        t = tau.expand(2 * n).to(device)
        eps = unet_eps(unet, scheduler, torch.cat([x, x]), t, both)
        eps_c, eps_u = eps[:n], eps[n:]
        eps = eps_u + guidance * (eps_c - eps_u)
        x = scheduler.step(eps, tau, x).prev_sample
    return x
