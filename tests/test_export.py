import pytest
import torch
from safetensors import safe_open

from esd_lora.adapter import load_adapters
from esd_lora.cli import main
from esd_lora.export import ExportError, export_adapter, pipeline_to_ldm
from esd_lora.models import load_pipeline
from test_merge import _unet_output


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_exported_adapter_loads_with_the_standard_loader_and_gives_the_same_outputs(fmt, tiny_models, tiny_adapters,
                                                                                      tmp_path):
    out = export_adapter(tiny_adapters["red"], tmp_path / f"red_{fmt}.safetensors", fmt)
    standard = load_pipeline(str(tiny_models["sd1"]))
    standard.load_lora_weights(str(out.parent), weight_name=out.name)
    ours = load_pipeline(str(tiny_models["sd1"]))
    load_adapters(ours, [tiny_adapters["red"]])
    base = _unet_output(load_pipeline(str(tiny_models["sd1"])))
    assert (_unet_output(ours) - base).abs().max() > 1e-3  # the adapter does something
    assert (_unet_output(standard) - _unet_output(ours)).abs().max() <= 1e-5


def test_kohya_export_keeps_the_trained_alpha_and_the_ss_header(tiny_adapters, tmp_path):
    out = export_adapter(tiny_adapters["red"], tmp_path / "red.safetensors", "kohya")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        alphas = [f.get_tensor(k).item() for k in f.keys() if k.endswith(".alpha")]
        assert all(k.startswith("lora_unet_") for k in f.keys())
    assert alphas and set(alphas) == {8.0}
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_network_module"] == "networks.lora" and "esd_lora.base_unet_sha256" in meta


def test_single_file_refuses_sdxl(tiny_models):
    with pytest.raises(ExportError, match="SDXL"):
        pipeline_to_ldm(load_pipeline(str(tiny_models["sdxl"])))


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "none"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert main(["export", str(tmp_path / "none"), "--out", str(tmp_path / "x.bin")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("esd-lora: error:") for line in err)
    assert not list(tmp_path.iterdir())
