from pathlib import Path

import pytest
import torch

from esd_lora.adapter import ADAPTER_NAME, PRESETS, TargetError, adapter_file, lora_config, select_modules
from esd_lora.models import load_pipeline
from esd_lora.provenance import read_metadata, unet_sha256


def test_presets_select_the_papers_layers_on_every_family(tiny_model):
    family, path = tiny_model
    unet = load_pipeline(str(path)).unet
    chosen = {name: select_modules(unet, name) for name in PRESETS}
    attn2_blocks = {n.rsplit(".attn2", 1)[0] for n in chosen["esd-x"]}
    assert len(chosen["esd-x"]) == 4 * len(attn2_blocks) > 0
    assert all(".attn2." in n for n in chosen["esd-x"])
    assert set(chosen["esd-x-strict"]) < set(chosen["esd-x"])
    assert all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in chosen["esd-x-strict"])
    assert not any(".attn2." in n or n.startswith(("time_embedding", "add_embedding")) or n == "conv_out"
                   for n in chosen["esd-u"])
    assert any(".attn1." in n for n in chosen["esd-u"]) and any("resnets" in n for n in chosen["esd-u"])
    assert set(chosen["esd-u"]) | set(chosen["esd-x"]) < set(chosen["esd-all"])
    if family == "sdxl":
        assert any(n.startswith("add_embedding") for n in chosen["esd-all"])


def test_explicit_lists_regexes_and_selections_of_nothing(tiny_models):
    unet = load_pipeline(str(tiny_models["sd1"])).unet
    assert select_modules(unet, ["attn2.to_k"]) == select_modules(unet, r".*attn2\.to_k")
    with pytest.raises(TargetError, match="selects no"):
        select_modules(unet, r".*attn3\..*")
    with pytest.raises(TargetError, match="'attn9.to_k' matches no"):
        select_modules(unet, ["attn2.to_k", "attn9.to_k"])
    with pytest.raises(TargetError, match="neither a preset"):
        select_modules(unet, "esd-x[")


def test_zero_init_adapter_leaves_the_models_outputs_unchanged(tiny_models):
    from test_merge import _unet_output

    pipe = load_pipeline(str(tiny_models["sd1"]))
    before = _unet_output(pipe)
    pipe.unet.add_adapter(lora_config(2, 2.0, 0.0, "default", select_modules(pipe.unet, "esd-x")),
                          adapter_name=ADAPTER_NAME)
    assert torch.equal(_unet_output(pipe), before)
    b = [p for n, p in pipe.unet.named_parameters() if "lora_B" in n]
    assert b and all((p == 0).all() for p in b)


def test_shipped_reference_adapters_match_the_shipped_toy_model():
    folders = sorted(p for p in (Path(__file__).parents[1] / "adapters").iterdir() if p.is_dir())
    assert folders
    base = unet_sha256(load_pipeline("toy"))
    for folder in folders:
        assert read_metadata(adapter_file(folder))["esd_lora.base_unet_sha256"] == base, folder.name


def test_concept_tokens_are_the_words_only_the_concept_prompts_use(tmp_path):
    from esd_lora.adapter import concept_token_ids
    from esd_lora.recipe import ConceptSection
    from esd_lora.toy.vocab import build_tokenizer

    tok = build_tokenizer(tmp_path)
    concept = ConceptSection(prompts=["red", "crimson star"], contexts=["a photo of a {} star"],
                             preserve=["red", "orange"])
    assert concept_token_ids(tok, concept) == sorted(tok.convert_tokens_to_ids(["red", "crimson"]))
    with pytest.raises(TargetError, match="adapter.concept_tokens: every word"):
        concept_token_ids(tok, ConceptSection(prompts=["a star"], preserve=["a blue star"]))
