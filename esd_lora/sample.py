"""Image generation with fixed seeds, and image grids for people to look at.

Every image has its own seeded generator, so image i of a prompt is the same whatever the
batch size, and base and erased models can be compared picture by picture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 5.0


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = DEFAULT_STEPS,
             guidance: float = DEFAULT_GUIDANCE, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1], one per (prompt, seed) pair."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    device = pipe.unet.device
    out = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress or len(starts) < 2):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[chunk]]
        images = pipe(prompt=prompts[chunk], num_inference_steps=steps, guidance_scale=guidance,
                      generator=generators, output_type="pt").images
        out.append(images.float().cpu() * 2 - 1)
    return torch.cat(out)


def to_pil_grid(images: torch.Tensor, cols: int, scale: int = 1, pad: int = 2):
    """A PIL image of a grid of images in [-1, 1], separated by grey lines."""
    from PIL import Image

    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    n, h, w, _ = arr.shape
    rows = -(-n // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 64, np.uint8)
    for i, img in enumerate(arr):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    pil = Image.fromarray(grid)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def save_png(image, path: str | Path) -> None:
    """Save a PIL image crash-safely."""
    from .io import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
