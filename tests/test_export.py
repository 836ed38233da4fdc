import shutil

import pytest
import torch
from safetensors import safe_open

from esd_lora.adapter import WEIGHTS_NAME, load_adapters, read_metadata
from esd_lora.cli import main
from esd_lora.errors import EsdLoraError
from esd_lora.export import (SDXL_TEXT_2_PREFIX, SDXL_TEXT_PREFIX, ExportError, clip_to_ldm, export_adapter,
                             open_clip_to_ldm, save_single_file, unet_to_ldm)
from esd_lora.models import load_pipeline
from test_merge import _unet_output
from test_stack import _embeds

SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


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


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_a_text_encoder_adapter_exports_so_the_standard_loader_adapts_the_text_encoder_alike(fmt, tiny_models,
                                                                                            tiny_adapters, tmp_path):
    out = export_adapter(tiny_adapters["red_te"], tmp_path / f"te_{fmt}.safetensors", fmt)
    if fmt == "kohya":  # kohya's name for an SD 1.x text encoder's layers
        with safe_open(str(out), "pt") as f:
            assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in f.keys()
    standard, ours, base = (load_pipeline(str(tiny_models["sd1"])) for _ in range(3))
    standard.load_lora_weights(str(out.parent), weight_name=out.name)
    load_adapters(ours, [tiny_adapters["red_te"]])

    assert (_embeds(ours, "a red shape") - _embeds(base, "a red shape")).abs().max() > 1e-3
    assert (_embeds(standard, "a red shape") - _embeds(ours, "a red shape")).abs().max() <= 1e-5
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



def _kohya_header(adapter, tmp_path) -> dict[str, str]:
    out = export_adapter(adapter, tmp_path / "exported.safetensors", "kohya")
    with safe_open(str(out), "pt") as f:
        return f.metadata()


def _with_header(adapter, out, **changes):
    """A copy of the adapter whose header fields are changed (None removes one), as an older or damaged one."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    file = out / WEIGHTS_NAME
    meta = read_metadata(file)
    for key, value in changes.items():
        meta.pop(f"esd_lora.{key}")
        if value is not None:
            meta[f"esd_lora.{key}"] = value
    save_file(load_file(str(file)), str(file), metadata=meta)
    return out


@pytest.mark.parametrize("adapter, family, v2, version, architecture, prediction", [
    ("red", "sd1", "False", "sd_v1", "stable-diffusion-v1/lora", "epsilon"),
    ("sd2", "sd2", "True", "sd_v2_v", "stable-diffusion-v2-768-v/lora", "v"),
])
def test_kohya_header_tells_the_base_model_as_kohya_writes_it(adapter, family, v2, version, architecture, prediction,
                                                              tiny_models, tiny_adapters, tmp_path):
    meta = _kohya_header(tiny_adapters[adapter], tmp_path)
    assert meta["ss_v2"] == v2 and meta["ss_base_model_version"] == version
    assert meta["modelspec.architecture"] == architecture and meta["modelspec.prediction_type"] == prediction
    assert meta["ss_resolution"] == "(16, 16)" and meta["modelspec.resolution"] == "16x16"
    assert meta["ss_training_started_at"] == "1764140000.5" and meta["modelspec.date"] == "2025-11-26T06:53:20+00:00"
    assert meta["ss_sd_model_name"] == tiny_models[family].name and meta["modelspec.title"] == adapter
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["modelspec.implementation"] == "diffusers"


@pytest.mark.parametrize("adapter", ["red", "sd2"])
def test_kohya_header_of_an_older_adapter_leaves_out_what_it_cannot_know(adapter, tiny_adapters, tmp_path):
    old = _with_header(tiny_adapters[adapter], tmp_path / "old", prediction_type=None, resolution=None,
                       training_started_at=None)
    meta = _kohya_header(old, tmp_path)
    assert not {"ss_resolution", "ss_training_started_at", "modelspec.resolution", "modelspec.date"} & meta.keys()
    if adapter == "sd2":  # SD 2.x predicts either way, so the model spec's architecture is unknown
        assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2"
        assert not [k for k in meta if k.startswith("modelspec.")]
    else:
        assert meta["ss_v2"] == "False" and meta["ss_base_model_version"] == "sd_v1"
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
        assert meta["modelspec.prediction_type"] == "epsilon"


@pytest.mark.parametrize("field, value", [("prediction_type", "sample"), ("resolution", "16.5"),
                                          ("training_started_at", "yesterday")])
def test_kohya_export_refuses_a_header_field_it_cannot_read(field, value, tiny_adapters, tmp_path):
    damaged = _with_header(tiny_adapters["red"], tmp_path / "damaged", **{field: value})
    with pytest.raises(EsdLoraError, match=f"esd_lora.{field} is"):
        export_adapter(damaged, tmp_path / "x.safetensors", "kohya")
    assert not (tmp_path / "x.safetensors").exists()

def _clip(hidden: int, layers: int, heads: int, projection: int | None = None, vocab: int = 49408,
          positions: int = 77):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=positions,
                            projection_dim=projection or hidden)
    return (CLIPTextModel if projection is None else CLIPTextModelWithProjection)(config)


def test_sdxl_single_file_reloads_offline_with_every_weight_equal(tiny_models, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = load_pipeline(str(tiny_models["sdxl"]))
    torch.manual_seed(0)
    with torch.no_grad():  # no weight left at its initial value, so a weight the file lacks cannot pass unseen
        for name in SDXL_COMPONENTS:
            for p in getattr(pipe, name).parameters():
                p.copy_(torch.randn_like(p))
    config = tmp_path / "config"
    pipe.save_pretrained(config)
    for weights in config.rglob("*.safetensors"):  # the configs only: every weight must come from the file
        weights.unlink()
    single = save_single_file(pipe, tmp_path / "xl.safetensors", {"esd_lora.erased": "[]"})

    reloaded = StableDiffusionXLPipeline.from_single_file(str(single), config=str(config), local_files_only=True)
    for name in SDXL_COMPONENTS:
        ours, theirs = getattr(pipe, name).state_dict(), getattr(reloaded, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_sdxl_key_maps_invert_diffusers_converters_at_sdxl_base_1_0_shapes():
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_open_clip_checkpoint,
                                                     infer_diffusers_model_type)

    with torch.device("meta"):  # SDXL base 1.0's real configuration, without allocating its weights
        unet = UNet2DConditionModel(
            sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        clip_l, clip_g = _clip(768, 12, 12), _clip(1280, 32, 20, 1280)
    ldm_unet = unet_to_ldm(unet)
    for key in ("label_emb.0.0.weight", "input_blocks.3.0.op.weight",
                "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
                "middle_block.1.transformer_blocks.9.ff.net.2.weight", "output_blocks.2.2.conv.weight",
                "output_blocks.5.2.conv.weight", "output_blocks.8.0.skip_connection.weight"):
        assert "model.diffusion_model." + key in ldm_unet, key
    back = convert_ldm_unet_checkpoint(ldm_unet, unet.config)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in unet.state_dict().items()}

    text = {**clip_to_ldm(clip_l, SDXL_TEXT_PREFIX),
            **{SDXL_TEXT_2_PREFIX + k: v for k, v in open_clip_to_ldm(clip_g).items()}}
    assert infer_diffusers_model_type({**ldm_unet, **text}) == "xl_base"
    assert text[SDXL_TEXT_2_PREFIX + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3 * 1280, 1280)
    back = convert_open_clip_checkpoint(clip_g, text, prefix=SDXL_TEXT_2_PREFIX)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in clip_g.state_dict().items()}


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "none"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert main(["export", str(tmp_path / "none"), "--out", str(tmp_path / "x.bin")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("esd-lora: error:") for line in err)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_retrained_token_rows_are_not_exported_as_a_lora_no_loader_would_read(fmt, tiny_adapters, tmp_path):
    with pytest.raises(ExportError, match="retrains token embeddings.*merge it"):
        export_adapter(tiny_adapters["red_tokens"], tmp_path / "out.safetensors", fmt)
    assert not (tmp_path / "out.safetensors").exists()
