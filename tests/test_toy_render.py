import numpy as np

from esd_lora.toy.render import RGB, SIZE, Scene, random_scene, render, render_batch, to_tensor, to_uint8
from esd_lora.toy.vocab import SHAPES, TEXTURES


def test_render_is_one_coloured_shape_on_black():
    img = render(Scene("blue", "square", "solid", 16, 16, 10))
    assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
    assert (img[0, 0] == 0).all() and (img[-1, -1] == 0).all()
    assert tuple(img[16, 16]) == RGB["blue"]


def test_every_shape_differs_and_stays_inside_the_frame():
    rng = np.random.default_rng(0)
    masks = {}
    for shape in SHAPES:
        for _ in range(20):
            img = render(random_scene(rng, colour="white", shape=shape, texture="solid"))[..., 0]
            border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
            assert border.max() < 200, shape  # at most an anti-aliased edge: no shape is cut off
        masks[shape] = render(Scene("white", shape, "solid", 16, 16, 12))[..., 0] > 127
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).sum() > 20, (a, b)


def test_textures_modulate_brightness_inside_the_shape():
    coverage = {}
    for texture in TEXTURES:
        img = render(Scene("white", "square", texture, 16, 16, 13))[8:24, 8:24, 0]
        coverage[texture] = (img > 200).mean()
        assert img.min() > 0  # dim cells keep the silhouette visible
    assert coverage["solid"] == 1.0
    assert abs(coverage["striped"] - 0.5) < 0.05 and abs(coverage["checkered"] - 0.5) < 0.05
    assert abs(coverage["dotted"] - 0.25) < 0.05


def test_random_scenes_vary_position_and_size_and_round_trip_tensors():
    rng = np.random.default_rng(1)
    scenes = [random_scene(rng) for _ in range(50)]
    assert len({round(s.cx) for s in scenes}) > 5 and len({round(s.radius) for s in scenes}) > 2
    images = render_batch(scenes)
    x = to_tensor(images)
    assert x.shape == (50, 3, SIZE, SIZE) and x.min() >= -1 and x.max() <= 1
    assert (to_uint8(x) == images).all()
