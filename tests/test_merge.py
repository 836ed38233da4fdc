import json

import pytest
import torch
from safetensors import safe_open

from esd_lora.adapter import AdapterError, load_adapters
from esd_lora.cli import main
from esd_lora.merge import merge, verify
from esd_lora.models import ModelLoadError, load_pipeline
from esd_lora.sample import generate
from test_stack import _embeds


def _unet_output(pipe, seed=0):
    torch.manual_seed(seed)
    size = pipe.unet.config.sample_size
    x = torch.randn(2, pipe.unet.config.in_channels, size, size)
    text = torch.randn(2, 32, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500, 100]), text).sample


def test_merged_pipeline_equals_base_plus_adapters_and_has_no_lora_left(tiny_models, tiny_adapters, tmp_path):
    adapters = [tiny_adapters["red"], tiny_adapters["star"]]
    out = merge(str(tiny_models["sd1"]), adapters, tmp_path / "merged", weights=[1.0, 0.5])
    merged = load_pipeline(str(out))
    assert not any("lora" in k or "base_layer" in k for k in merged.unet.state_dict())
    live = load_pipeline(str(tiny_models["sd1"]))
    load_adapters(live, adapters, [1.0, 0.5])
    assert (_unet_output(merged) - _unet_output(live)).abs().max() <= 1e-5
    images = [generate(p, ["a red shape"] * 2, [0, 1], steps=3, progress=False) for p in (merged, live)]
    assert (images[0] - images[1]).abs().max() <= 1e-5


# LoRA layers in the text encoder; and retrained token rows (adapter.concept_tokens) beside another adapter's layers
@pytest.mark.parametrize("names, prompt", [(["red_te", "star"], "a red shape"),
                                           (["red_tokens", "red_te"], "a crimson shape")])
def test_a_text_encoder_adapter_merges_into_both_models_as_it_draws_live(names, prompt, tiny_models, tiny_adapters,
                                                                         tmp_path):
    adapters = [tiny_adapters[n] for n in names]
    out = merge(str(tiny_models["sd1"]), adapters, tmp_path / "merged")
    merged, live, base = (load_pipeline(str(p)) for p in (out, tiny_models["sd1"], tiny_models["sd1"]))
    load_adapters(live, adapters)
    assert not any(w in k for k in merged.text_encoder.state_dict() for w in ("lora", "base_layer", "trainable_tokens"))

    assert (_embeds(live, prompt) - _embeds(base, prompt)).abs().max() > 1e-3  # the text encoder's adapter does something
    assert (_embeds(merged, prompt) - _embeds(live, prompt)).abs().max() <= 1e-5
    images = [generate(p, [prompt] * 2, [0, 1], steps=3, progress=False) for p in (merged, live)]
    assert (images[0] - images[1]).abs().max() <= 1e-5
    result = verify(out, str(tiny_models["sd1"]), adapters)
    assert result["max_abs_diff"] == 0.0 and result["tensors"]["text_encoder.encoder.layers.0.self_attn.q_proj.weight"] == 0


def test_every_weight_file_carries_provenance_and_the_card_lists_the_erasures(tiny_models, tiny_adapters, tmp_path):
    out = merge(str(tiny_models["sd1"]), [tiny_adapters["red"]], tmp_path / "merged")
    files = list(out.rglob("*.safetensors"))
    assert len(files) == 3
    for file in files:
        with safe_open(str(file), "pt") as f:
            meta = f.metadata()
        assert json.loads(meta["esd_lora.erased"]) == [["a red shape"]]
        assert len(json.loads(meta["esd_lora.adapters_sha256"])[0]) == 64 and meta["esd_lora.base_unet_sha256"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "base_model_relation: merge" in card and "| a red shape |" in card


@pytest.mark.parametrize("family, adapter", [("sd1", "red"), ("sd2", "sd2")])
def test_single_file_export_reloads_offline_with_the_same_weights(family, adapter, tiny_models, tiny_adapters,
                                                                   tmp_path):
    from diffusers import StableDiffusionPipeline

    single = tmp_path / "merged.safetensors"
    out = merge(str(tiny_models[family]), [tiny_adapters[adapter]], tmp_path / "merged", single_file=single)
    with safe_open(str(single), "pt") as f:
        keys = list(f.keys())
        assert json.loads(f.metadata()["esd_lora.erased"]) == [["a red shape"]]
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    reloaded = StableDiffusionPipeline.from_single_file(str(single), config=str(out), local_files_only=True,
                                                        safety_checker=None)
    merged = load_pipeline(str(out))
    for component in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(merged, component).state_dict(), getattr(reloaded, component).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), component


def test_verify_reports_zero_for_an_honest_merge_and_catches_a_tampered_one(tiny_models, tiny_adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    out = merge(str(tiny_models["sd1"]), [tiny_adapters["red"]], tmp_path / "merged")
    assert verify(out, str(tiny_models["sd1"]), [tiny_adapters["red"]])["max_abs_diff"] == 0.0
    file = out / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(file))
    key = next(k for k in state if k.endswith("attn2.to_k.weight"))
    state[key][0, 0] += 0.25
    save_file(state, str(file))
    result = verify(out, str(tiny_models["sd1"]), [tiny_adapters["red"]])
    assert result["worst_tensor"] == f"unet.{key}" and result["max_abs_diff"] == pytest.approx(0.25, abs=1e-6)
    assert main(["verify", str(out), "--base", str(tiny_models["sd1"]), "--adapters", str(tiny_adapters["red"])]) == 2


@pytest.mark.parametrize("which, words", [
    ("missing", "no such file or folder"),
    ("other_base", "trained for another base model"),
    ("other_family", "trained for an sd2 model"),
])
def test_bad_adapters_give_one_error_and_write_nothing(which, words, tiny_models, tiny_adapters, tmp_path, capsys):
    from conftest import make_adapter

    adapter = {"missing": tmp_path / "nothing", "other_family": tiny_adapters["sd2"]}.get(which)
    if which == "other_base":
        adapter = make_adapter(tiny_models["sdxl"], tmp_path / "xl", ["x"])  # an sdxl adapter without a family field is caught by its base hash
        from esd_lora.adapter import WEIGHTS_NAME
        from esd_lora.provenance import read_metadata
        from safetensors.torch import load_file, save_file

        file = adapter / WEIGHTS_NAME
        meta = read_metadata(file)
        del meta["esd_lora.base_family"]
        save_file(load_file(str(file)), str(file), metadata=meta)
    out = tmp_path / "merged"
    capsys.readouterr()
    assert main(["merge", str(adapter), "--base", str(tiny_models["sd1"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()


def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_pipeline(str(ckpt))
    with pytest.raises(AdapterError, match="only .safetensors"):
        merge("toy", [ckpt], tmp_path / "out")


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_verify_accepts_an_honest_half_precision_merge_at_the_default_tolerance(dtype, tiny_models, tiny_adapters,
                                                                                  tmp_path):
    out = merge(str(tiny_models["sd1"]), [tiny_adapters["red"]], tmp_path / "merged", dtype=dtype)
    result = verify(out, str(tiny_models["sd1"]), [tiny_adapters["red"]])
    assert result["max_abs_diff"] == 0.0 and set(result["stored_dtypes"].values()) == {
        {"fp16": "float16", "bf16": "bfloat16"}[dtype]}
    assert main(["verify", str(out), "--base", str(tiny_models["sd1"]), "--adapters", str(tiny_adapters["red"])]) == 0


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_merge_replaces_only_what_it_is_asked_to_and_never_an_input(tiny_models, tiny_adapters, tmp_path, capsys):
    import shutil

    base = str(tiny_models["sd1"])
    adapter = tmp_path / "copyred"
    shutil.copytree(tiny_adapters["red"], adapter)
    kept = tmp_path / "mine"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    before = _snapshot(tmp_path)
    capsys.readouterr()
    for argv in (["--out", str(kept)], ["--out", str(adapter)], ["--out", str(adapter), "--overwrite"],
                 ["--out", str(tmp_path / "m"), "--single-file", str(kept / "notes.txt")],
                 ["--out", str(kept / "notes.txt" / "deeper")]):
        assert main(["merge", str(adapter), "--base", base, *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("esd-lora: error: --"), err
    assert _snapshot(tmp_path) == before and not (tmp_path / "m").exists()
    assert main(["merge", str(adapter), "--base", base, "--out", str(kept), "--overwrite"]) == 0
    assert (kept / "model_index.json").is_file() and not (kept / "notes.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or .old left


@pytest.mark.parametrize("weights, message", [([1.0, 1.0], "retrains the embedding of .red."), ([0.5], "cannot be weighted")])
def test_token_rows_are_neither_weighted_nor_retrained_twice(weights, message, tiny_models, tiny_adapters, tmp_path):
    adapters = [tiny_adapters["red_tokens"]] * len(weights)
    with pytest.raises(AdapterError, match=message):
        merge(str(tiny_models["sd1"]), adapters, tmp_path / "merged", weights=weights)
    assert not (tmp_path / "merged").exists()
