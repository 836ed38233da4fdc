import pytest
from PIL import Image

from esd_lora.cli import main


def test_sample_writes_a_grid_and_single_images(tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "a crimson striped star", "--n", "3", "--steps", "5", "--scale", "1",
                 "--out", str(out), "--out-dir", str(tmp_path / "images")]) == 0
    grid = Image.open(out)
    assert grid.size == (3 * 34 + 2, 34 + 2)
    singles = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert singles == ["base_00000.png", "base_00001.png", "base_00002.png"]
    assert Image.open(tmp_path / "images" / singles[0]).size == (32, 32)


def test_sample_with_an_adapter_adds_a_row_with_the_same_seeds(tmp_path):
    from pathlib import Path

    adapter = Path(__file__).parents[1] / "adapters" / "red"
    out = tmp_path / "grid.png"
    assert main(["sample", "a red shape", "--n", "2", "--steps", "5", "--scale", "1", "--out", str(out),
                 "--adapter", str(adapter)]) == 0
    assert Image.open(out).size == (2 * 34 + 2, 2 * 34 + 2)


@pytest.mark.parametrize("argv, words", [
    (["sample", "x", "--model", "/no/such/model"], "cannot load model"),
    (["sample", "x", "--model", "nobody/no-such-model-here"], "cannot load model"),
    (["sample", "x", "--adapter", "/no/such/adapter"], "no such file or folder"),
    (["sample", "x", "--n", "0"], "--n"),
    (["train", "/no/such/recipe.yaml"], "no such file"),
])
def test_errors_are_one_line(argv, words, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(argv + (["--out", str(tmp_path / "g.png")] if argv[0] == "sample" else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "g.png").exists()
