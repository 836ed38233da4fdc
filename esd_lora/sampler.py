"""Where ESD's training latents x_t come from: partial guided DDIM sampling of the concept itself.

No training images are used. Step k of a T-step DDIM schedule leaves the latent at DDIM timestep
tau_k; the loss timestep t is then drawn in tau_k's band of width 1000/T (for 1000 training timesteps),
so over training every noise level from pure noise to clean is covered.
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


def loss_timestep(ks: list[int], steps: int, generator: torch.Generator, train_timesteps: int = 1000) -> torch.Tensor:
    """One DDPM timestep per sample, drawn uniformly in the band of its DDIM step k (k=0: the noisiest band)."""
    width = train_timesteps // steps
    lows = torch.tensor([(steps - 1 - k) * width for k in ks])
    return lows + torch.randint(0, width, (len(ks),), generator=generator)


@torch.no_grad()
def sample_trajectory(unet, scheduler, cond: dict, uncond: dict, stop: int, steps: int, guidance: float,
                      generator: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype,
                      device: torch.device | str) -> torch.Tensor:
    """Run `stop` guided DDIM steps (eta 0) from Gaussian noise and return every latent on the way,
    stacked: entry k is the latent after k steps, the x_t that ESD trains on at DDIM index k.

    The concept and empty-prompt halves of each step go through the UNet as one batch. The paper
    samples a fresh partial run (stop = k) for every training step; a full run (stop = steps - 1)
    gives a latent for every index at once, which `train.refresh_every` reuses over several steps."""
    timesteps = ddim_timesteps(scheduler, steps)
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
    x = x * scheduler.init_noise_sigma
    both = cat_conditions([cond, uncond])
    n = shape[0]
    latents = [x]
    for tau in timesteps[:stop]:
        t = tau.expand(2 * n).to(device)
        eps = unet_eps(unet, scheduler, torch.cat([x, x]), t, both)
        eps_c, eps_u = eps[:n], eps[n:]
        eps = eps_u + guidance * (eps_c - eps_u)
        x = scheduler.step(eps, tau, x).prev_sample
        latents.append(x)
    return torch.stack(latents)
