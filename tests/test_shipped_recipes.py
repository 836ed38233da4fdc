"""Every shipped real-model recipe, run as shipped on a tiny random model of its family.

Only `model.id` (a tiny model saved in fp32, as hub weights are), the step count and the output folder
are overridden: the dtype, mixed precision, optimizer, targets, sampler and gradient checkpointing are
the recipe's own. Each recipe goes train -> sample -> merge (and single file) -> verify -> both exports,
which diffusers' own loader applies to the base with the merged model's results -> stack. A recipe added
to recipes/ is tested by being there.
"""

from pathlib import Path

import pytest
import torch

from esd_lora.cli import main
from esd_lora.models import load_pipeline
from esd_lora.adapter import adapter_provenance
from esd_lora.provenance import unet_sha256
from esd_lora.recipe import load_recipe
from esd_lora.sample import generate

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
FAMILY_OF = {  # the hub models the shipped recipes name, and the tiny family standing in for each
    "CompVis/stable-diffusion-v1-4": "sd1",
    "stabilityai/stable-diffusion-2-1": "sd2",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
}


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one precision per process; each recipe sets its own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _cli(*argv: str) -> None:
    assert main([str(a) for a in argv]) == 0, argv


def _images(pipe, prompt: str) -> torch.Tensor:
    return generate(pipe, [prompt] * 2, [0, 1], steps=3, progress=False)


def test_the_real_recipes_are_all_here():
    assert {r.stem for r in RECIPES} >= {"van_gogh", "van_gogh_sdxl", "nudity", "church"}


@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_end_to_end(recipe_path, tiny_models, tmp_path, fresh_accelerate, capsys):
    from diffusers import DiffusionPipeline

    recipe = load_recipe(recipe_path)
    assert recipe.model.id in FAMILY_OF, f"{recipe_path.name}: add its model's family to FAMILY_OF"
    model = tiny_models[FAMILY_OF[recipe.model.id]]
    adapters = []
    for seed in (0, 1):  # a second erasure, for the stack
        out = tmp_path / f"adapter{seed}"
        _cli("train", recipe_path, f"model.id={model}", "train.steps=2", f"train.seed={seed}", f"output.dir={out}",
             "--quiet")
        adapters.append(out)
    shipped = load_recipe(adapters[0] / "recipe.yaml")
    assert (shipped.model.dtype, shipped.train.mixed_precision) == (recipe.model.dtype, recipe.train.mixed_precision)
    record = adapter_provenance(adapters[0])
    assert record.base_unet_sha256 == unet_sha256(load_pipeline(str(model)))  # fp32 load, same identity

    prompt = recipe.concept.prompts[-1]
    _cli("sample", prompt, "--model", model, "--adapter", adapters[0], "--n", 2, "--steps", 3, "--out",
         tmp_path / "grid.png")
    assert (tmp_path / "grid.png").is_file()

    merged, single = tmp_path / "merged", tmp_path / "merged.safetensors"
    _cli("merge", adapters[0], "--base", model, "--out", merged, "--single-file", single)
    _cli("verify", merged, "--base", model, "--adapters", adapters[0])
    merged_pipe = load_pipeline(str(merged))
    reloaded = type(merged_pipe).from_single_file(str(single), config=str(merged), local_files_only=True)
    for component, module in merged_pipe.components.items():
        if isinstance(module, torch.nn.Module):
            theirs = getattr(reloaded, component).state_dict()
            assert all(torch.equal(v, theirs[k]) for k, v in module.state_dict().items()), component

    expected = _images(merged_pipe, prompt)
    for fmt in ("kohya", "diffusers"):
        exported = tmp_path / f"{fmt}.safetensors"
        _cli("export", adapters[0], "--format", fmt, "--out", exported)
        base = DiffusionPipeline.from_pretrained(str(model))
        base.load_lora_weights(str(tmp_path), weight_name=exported.name)
        base.set_progress_bar_config(disable=True)
        assert (_images(base, prompt) - expected).abs().max() <= 1e-4, fmt

    stacked = tmp_path / "stacked"
    _cli("stack", *adapters, "--base", model, "--out", stacked)
    _cli("verify", stacked, "--base", model, "--adapters", *adapters)
    capsys.readouterr()
