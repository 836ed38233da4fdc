"""The README figure: renders beside the toy model's samples for the same captions.

People judge "does it look like the renders?" faster from a picture than from a table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .render import random_scene, render_batch, to_tensor

CAPTIONS = [("red", "circle", "solid"), ("orange", "star", "striped"), ("yellow", "heart", "dotted"),
            ("green", "ring", "checkered"), ("cyan", "square", "striped"), ("blue", "triangle", "dotted"),
            ("purple", "diamond", "checkered"), ("white", "cross", "solid")]


def comparison_figure(model: str = "toy", n: int = 8, scale: int = 3):
    """A PIL image: one row per caption, n renders on the left, n samples (seeds 0..n-1) on the right."""
    import torch
    from PIL import Image, ImageDraw

    from ..models import load_pipeline
    from ..sample import generate, to_pil_grid

    rng = np.random.default_rng(0)
    captions = [f"a {c} {t} {s}" for c, s, t in CAPTIONS]
    renders = to_tensor(render_batch([random_scene(rng, c, s, t) for c, s, t in CAPTIONS for _ in range(n)]))
    samples = generate(load_pipeline(model), [p for p in captions for _ in range(n)], list(range(n)) * len(captions))
    left, right = (to_pil_grid(torch.as_tensor(x), cols=n, scale=scale) for x in (renders, samples))
    label_w, title_h, gap = 170, 20, 12
    figure = Image.new("RGB", (label_w + left.width + gap + right.width, title_h + left.height), "white")
    figure.paste(left, (label_w, title_h))
    figure.paste(right, (label_w + left.width + gap, title_h))
    draw = ImageDraw.Draw(figure)
    draw.text((label_w, 4), "renders", fill="black")
    draw.text((label_w + left.width + gap, 4), f"toy model samples (seeds 0-{n - 1})", fill="black")
    row_h = left.height / len(captions)
    for i, caption in enumerate(captions):
        draw.text((4, title_h + (i + 0.5) * row_h - 5), caption, fill="black")
    return figure


def save_figure(out: str | Path, model: str = "toy") -> Path:
    """Write the figure as PNG, crash-safely."""
    from ..sample import save_png

    save_png(comparison_figure(model), out)
    return Path(out)
