import numpy as np

from esd_lora.toy.figure import CAPTIONS, comparison_figure


def test_figure_has_one_row_per_caption_renders_left_samples_right():
    figure = comparison_figure(n=2, scale=1)
    grid_w, grid_h = 2 * 34 + 2, len(CAPTIONS) * 34 + 2
    assert figure.size == (170 + grid_w + 12 + grid_w, 20 + grid_h)
    first_row = np.asarray(figure)[22:56, 170:170 + grid_w]  # the renders of "a red solid circle"
    red = (first_row[..., 0] > 150) & (first_row[..., 1] < 80) & (first_row[..., 2] < 80)
    assert red.mean() > 0.2
