"""A small CNN that reads colour, shape and texture back out of a toy image.

It is the toy world's ground truth: every efficacy and specificity figure on the toy
model is this classifier's reading of generated images.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .render import random_scene, render_batch, to_tensor
from .vocab import COLOURS, KINDS, SHAPES, TEXTURES

HEADS: dict[str, list[str]] = {kind: list(table) for kind, table in KINDS.items()}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
    )


class ConceptClassifier(nn.Module):
    """Three heads over one convolutional trunk; input is NCHW in [-1, 1] at 32x32."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            _block(3, 32), nn.MaxPool2d(2), _block(32, 64), nn.MaxPool2d(2), _block(64, 128),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({kind: nn.Linear(128, len(names)) for kind, names in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(x)
        return {kind: head(features) for kind, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, list[str]]:
        """Concept names per head for a batch of images in [-1, 1]."""
        self.eval()
        out: dict[str, list[str]] = {kind: [] for kind in HEADS}
        for chunk in images.split(batch_size):
            logits = self(chunk.float())
            for kind, names in HEADS.items():
                out[kind] += [names[i] for i in logits[kind].argmax(1).tolist()]
        return out


def labelled_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n fresh renders with their label indices per head."""
    scenes = [random_scene(rng) for _ in range(n)]
    images = to_tensor(render_batch(scenes))
    labels = {
        "colour": torch.tensor([list(COLOURS).index(s.colour) for s in scenes]),
        "shape": torch.tensor([list(SHAPES).index(s.shape) for s in scenes]),
        "texture": torch.tensor([list(TEXTURES).index(s.texture) for s in scenes]),
    }
    return images, labels


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise and slight blur, so the classifier also reads imperfect generated images."""
    n = images.shape[0]
    sigma = torch.rand(n, 1, 1, 1, generator=generator) * 0.15
    images = images + sigma * torch.randn(images.shape, generator=generator)
    blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    blurred = nn.functional.conv2d(images, blur.expand(3, 1, 3, 3), padding=1, groups=3)
    mix = (torch.rand(n, 1, 1, 1, generator=generator) < 0.3).float() * torch.rand(n, 1, 1, 1, generator=generator)
    return (1 - mix) * images + mix * blurred


def train_classifier(steps: int = 1500, batch_size: int = 128, seed: int = 0) -> ConceptClassifier:
    """Train on fresh renders each step; returns the model in eval mode."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ConceptClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for _ in (bar := tqdm(range(steps), desc="classifier")):
        images, labels = labelled_batch(rng, batch_size)
        logits = model(augment(images, gen))
        loss = sum(nn.functional.cross_entropy(logits[k], labels[k]) for k in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def accuracy(model: ConceptClassifier, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-head accuracy on labelled images."""
    predicted = model.predict(images)
    return {
        kind: float(np.mean([HEADS[kind][int(i)] == p for i, p in zip(labels[kind], predicted[kind])]))
        for kind in HEADS
    }


def save_classifier(model: ConceptClassifier, path: str | Path) -> None:
    """Atomic safetensors write."""
    from ..io import atomic_save_safetensors

    atomic_save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def load_classifier(path: str | Path | None = None) -> ConceptClassifier:
    """Load the shipped classifier, or one at path."""
    from safetensors.torch import load_file

    from .paths import CLASSIFIER_PATH

    model = ConceptClassifier()
    model.load_state_dict(load_file(str(path or CLASSIFIER_PATH)))
    return model.eval()
