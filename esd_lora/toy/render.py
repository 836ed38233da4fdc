"""Renders of the toy world: one coloured, textured shape on a black 32x32 background.

Textures repeat every 4 pixels and are anchored to the image grid, not to the shape, so
each 4x4 cell of a textured shape shows the same pattern: that keeps them legible after
the toy autoencoder's 4x downsampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .vocab import COLOURS, SHAPES, TEXTURES

SIZE = 32
SUPERSAMPLE = 4
DIM = 0.3  # brightness of the "off" cells of a texture, so the silhouette stays visible

RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "orange": (255, 140, 0),
    "yellow": (245, 235, 30),
    "green": (30, 200, 40),
    "cyan": (0, 225, 225),
    "blue": (40, 70, 255),
    "purple": (165, 45, 230),
    "white": (255, 255, 255),
}
assert set(RGB) == set(COLOURS)

_yy, _xx = np.mgrid[0:SIZE, 0:SIZE]
TEXTURE_MASKS: dict[str, np.ndarray] = {
    "solid": np.ones((SIZE, SIZE), bool),
    "striped": (_yy % 4) < 2,
    "dotted": np.isin(_yy % 4, (1, 2)) & np.isin(_xx % 4, (1, 2)),
    "checkered": ((_yy // 2 + _xx // 2) % 2) == 0,
}
assert set(TEXTURE_MASKS) == set(TEXTURES)


@dataclass(frozen=True)
class Scene:
    """What one render shows: the three concepts plus placement (centre and radius, in pixels)."""

    colour: str
    shape: str
    texture: str
    cx: float
    cy: float
    radius: float


def _polygon(x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the sample grid."""
    inside = np.zeros(x.shape, bool)
    j = len(vx) - 1
    for i in range(len(vx)):
        crosses = (vy[i] > y) != (vy[j] > y)
        x_at = (vx[j] - vx[i]) * (y - vy[i]) / (vy[j] - vy[i] + 1e-12) + vx[i]
        inside ^= crosses & (x < x_at)
        j = i
    return inside


def _regular(n: int, radii: list[float], phase: float) -> tuple[np.ndarray, np.ndarray]:
    angles = phase + np.arange(n * len(radii)) * 2 * np.pi / (n * len(radii))
    r = np.array(radii * n)
    return r * np.cos(angles), r * np.sin(angles)


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of a shape centred at the origin; dy grows downwards, as in images."""
    u, v = dx / radius, dy / radius
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1) & (r2 >= 0.5**2)
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.8
    if shape == "diamond":
        return abs(u) + abs(v) <= 1
    if shape == "cross":
        return ((abs(u) <= 0.33) & (abs(v) <= 1)) | ((abs(v) <= 0.33) & (abs(u) <= 1))
    if shape == "triangle":
        vx, vy = _regular(3, [1.05], -np.pi / 2)
        return _polygon(u, v - 0.15, vx, vy)
    if shape == "star":
        vx, vy = _regular(5, [1.05, 0.45], -np.pi / 2)
        return _polygon(u, v - 0.05, vx, vy)
    if shape == "heart":
        hx, hy = 1.15 * u, -1.15 * v + 0.25
        return (hx * hx + hy * hy - 1) ** 3 - hx * hx * hy**3 <= 0
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene) -> np.ndarray:
    """An HxWx3 uint8 image of the scene, anti-aliased by supersampling."""
    n = SIZE * SUPERSAMPLE
    fine = (np.arange(n) + 0.5) / SUPERSAMPLE
    dy, dx = np.meshgrid(fine - scene.cy, fine - scene.cx, indexing="ij")
    mask = shape_mask(scene.shape, dx, dy, scene.radius).astype(np.float32)
    coverage = mask.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(1, 3))
    brightness = np.where(TEXTURE_MASKS[scene.texture], 1.0, DIM)
    rgb = np.array(RGB[scene.colour], np.float32)
    image = (coverage * brightness)[..., None] * rgb
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def random_scene(rng: np.random.Generator, colour: str | None = None, shape: str | None = None,
                 texture: str | None = None) -> Scene:
    """A scene with the given concepts (random where None), at a random size and position."""
    radius = float(rng.uniform(9.0, 13.0))
    margin = radius + 1.0
    return Scene(
        colour=colour or str(rng.choice(list(COLOURS))),
        shape=shape or str(rng.choice(list(SHAPES))),
        texture=texture or str(rng.choice(list(TEXTURES))),
        cx=float(rng.uniform(margin, SIZE - margin)),
        cy=float(rng.uniform(margin, SIZE - margin)),
        radius=radius,
    )


def render_batch(scenes: list[Scene]) -> np.ndarray:
    """N x 32 x 32 x 3 uint8 renders."""
    return np.stack([render(s) for s in scenes])


def to_tensor(images: np.ndarray):
    """uint8 NHWC images to a float NCHW tensor in [-1, 1], the range the autoencoder expects."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(tensor) -> np.ndarray:
    """Inverse of to_tensor."""
    return ((tensor.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
