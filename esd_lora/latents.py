"""Where ESD's training latents x_t come from: guided DDIM runs of the concept itself, no images.

Two sources, one interface (`draw`, `state`, `load_state`), so the training loop does not care which:
- `PartialRuns`, the paper's: every step runs k guided DDIM steps from noise to a fresh random index k;
- `RefreshedTrajectories`, the fast default: every `every` steps one full run of `batch` images is
  sampled with the model as it is, and each step takes a latent of each image at its own random index.
With preserve prompts sampled on their own latents (`concept.preserve_on: own`), each run also draws
as many images of the preserve prompts, after the concept's.
"""

from __future__ import annotations

import random
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .sampler import sample_trajectory


@dataclass
class LatentBatch:
    """Latents for one step: the concept's first (`batch` of them), then the preserve prompts' (own)."""

    x: torch.Tensor
    ks: list[int]  # the DDIM index of each concept latent
    picks: list[int]  # prompt indices of the images: concept prompts, then preserve prompts


@dataclass
class GuidedRuns:
    """Guided DDIM runs from noise of randomly picked concept (and preserve) prompts."""

    conditioner: Callable[[list[str]], dict]  # prompts -> UNet keyword arguments (models.Conditioner)
    scheduler: Any
    prompts: list[str]
    own_preserve: list[str]  # preserve prompts sampled on their own latents; empty otherwise
    batch: int
    steps: int
    guidance: float
    shape: tuple[int, ...]  # of one image's latent
    dtype: torch.dtype
    device: torch.device

    @property
    def images(self) -> int:
        return self.batch * (2 if self.own_preserve else 1)

    def pick(self, rng: random.Random) -> list[int]:
        """Concept prompt indices, then (own) preserve prompt indices, of the images to sample."""
        picks = [rng.randrange(len(self.prompts)) for _ in range(self.batch)]
        if self.own_preserve:
            picks += [rng.randrange(len(self.own_preserve)) for _ in range(self.batch)]
        return picks

    def prompts_of(self, picks: list[int]) -> list[str]:
        return [self.prompts[i] for i in picks[:self.batch]] + [self.own_preserve[j] for j in picks[self.batch:]]

    @torch.no_grad()
    def run(self, unet, picks: list[int], stop: int, generator: torch.Generator) -> torch.Tensor:
        """Every latent of `stop` guided steps (entry k: after k steps), for each picked prompt."""
        return sample_trajectory(unet, self.scheduler, self.conditioner(self.prompts_of(picks)),
                                 self.conditioner([""] * self.images), stop, self.steps, self.guidance, generator,
                                 (self.images, *self.shape), self.dtype, self.device)


Sampling = Callable[[], AbstractContextManager]  # yields the UNet that samples (trained or frozen)


class PartialRuns:
    """The paper's sampling: a fresh run to a random DDIM index k for every step (about T/2 guided steps)."""

    def __init__(self, runs: GuidedRuns) -> None:
        self.runs = runs

    def draw(self, step: int, gen: torch.Generator, rng: random.Random, sampling: Sampling) -> LatentBatch:
        picks = self.runs.pick(rng)
        k = int(torch.randint(0, self.runs.steps, (1,), generator=gen))
        with sampling() as unet:
            x = self.runs.run(unet, picks, k, gen)[-1]
        return LatentBatch(x, [k] * self.runs.batch, picks)

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Nothing carries over between steps."""


class RefreshedTrajectories:
    """One full run every `every` steps, with the model as it is then; each step trains on a latent of each
    image at its own random index. One run passes through every index, so a step costs 2 guided passes
    per image on average instead of T."""

    def __init__(self, runs: GuidedRuns, every: int) -> None:
        self.runs, self.every = runs, every
        self.trajectory: torch.Tensor | None = None
        self.picks: list[int] = []

    def draw(self, step: int, gen: torch.Generator, rng: random.Random, sampling: Sampling) -> LatentBatch:
        if self.trajectory is None or step % self.every == 0:
            self.picks = self.runs.pick(rng)
            with sampling() as unet:
                self.trajectory = self.runs.run(unet, self.picks, self.runs.steps - 1, gen)
        ks = [rng.randrange(self.runs.steps) for _ in range(self.runs.batch)]
        per_image = ks * (self.runs.images // self.runs.batch)  # preserve images share the concept's indices
        return LatentBatch(self.trajectory[per_image, torch.arange(self.runs.images)], ks, self.picks)

    def state(self) -> dict[str, Any]:
        """The trajectories in use and their prompts, so a resumed run continues exactly."""
        return {} if self.trajectory is None else {"trajectory": self.trajectory, "picks": self.picks}

    def load_state(self, state: dict[str, Any]) -> None:
        if "trajectory" in state:
            self.trajectory = state["trajectory"].to(self.runs.device, self.runs.dtype)
            self.picks = state["picks"]
