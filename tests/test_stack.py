import pytest
import torch

from esd_lora.adapter import load_adapters
from esd_lora.models import Conditioner, load_pipeline
from esd_lora.recipe import RecipeError, from_dict
from esd_lora.stack import fuse_adapters, joint_recipe, stack


def _embeds(pipe, prompt):
    return Conditioner(pipe, "cpu", torch.float32)([prompt])["encoder_hidden_states"][0]


def test_fuse_solves_its_least_squares_problem(tiny_models, tiny_adapters):
    model = str(tiny_models["sd1"])
    adapters = [tiny_adapters["red"], tiny_adapters["star"]]
    fused = load_pipeline(model)
    fuse_adapters(fused, adapters, preserve=["a green shape"])
    base, live = load_pipeline(model), load_pipeline(model)
    load_adapters(live, adapters)
    name = next(n for n, _ in base.unet.named_modules() if n.endswith("attn2.to_k"))
    w, w0 = (p.unet.get_submodule(name).weight.double() for p in (fused, base))
    e_red, e_star = _embeds(base, "a red shape").double(), _embeds(base, "a star").double()
    e_keep = torch.cat([_embeds(base, p) for p in ("a green shape", "a blue shape", "")]).double()
    layer = live.unet.get_submodule(name)
    d_red, d_star = (layer.get_delta_weight(n).double() for n in ("erase_0", "erase_1"))
    # the gradient of the objective vanishes at the solution (up to the small ridge term)
    grad = ((w - w0 - d_red) @ e_red.T @ e_red + (w - w0 - d_star) @ e_star.T @ e_star
            + (w - w0) @ e_keep.T @ e_keep)
    scale = (d_red @ e_red.T @ e_red).abs().max()
    assert grad.abs().max() / scale < 1e-2
    # and it lands between "no erasure" and "each adapter on its own prompt"
    assert ((e_red @ (w - w0 - d_red).T).norm() < (e_red @ d_red.T).norm())


@pytest.mark.parametrize("strategy", ["sum", "fuse"])
def test_stacking_adds_a_text_encoder_adapters_delta_to_the_text_encoder(strategy, tiny_models, tiny_adapters,
                                                                         tmp_path):
    adapters = [tiny_adapters["red_te"], tiny_adapters["star"]]
    out, _ = stack(str(tiny_models["sd1"]), strategy, tmp_path / strategy, adapters=adapters)
    stacked, live = load_pipeline(str(out)), load_pipeline(str(tiny_models["sd1"]))
    load_adapters(live, adapters)
    assert not any("lora" in k for k in stacked.text_encoder.state_dict())
    assert (_embeds(stacked, "a red shape") - _embeds(live, "a red shape")).abs().max() <= 1e-5


def test_sum_stack_writes_a_model_with_every_adapter_in_its_header(tiny_models, tiny_adapters, tmp_path):
    out, folded = stack(str(tiny_models["sd1"]), "sum", tmp_path / "s",
                        adapters=[tiny_adapters["red"], tiny_adapters["star"]])
    assert [f.record.concepts for f in folded] == [["a red shape"], ["a star"]]
    assert "strategy `sum`" in (out / "README.md").read_text()


def _recipe(model, prompt, out):
    return from_dict({"model": {"id": str(model)}, "concept": {"prompts": [prompt], "preserve": ["a blue shape"]},
                      "train": {"steps": 2, "ddim_steps": 4}, "output": {"dir": str(out)}}, name=prompt.split()[-1])


@pytest.mark.parametrize("strategy", ["sequential", "joint"])
def test_training_strategies_build_a_loadable_model(strategy, tiny_models, tmp_path):
    recipes = [_recipe(tiny_models["sd1"], p, tmp_path / "unused") for p in ("a red shape", "a blue shape")]
    out, folded = stack(str(tiny_models["sd1"]), strategy, tmp_path / "m", recipes=recipes, progress=False)
    assert len(folded) == (2 if strategy == "sequential" else 1)
    pipe = load_pipeline(str(out))
    assert not any("lora" in k for k in pipe.unet.state_dict())
    assert (tmp_path / "m-stages").is_dir()


def test_joint_recipe_drops_preserve_prompts_that_name_an_erased_concept(tiny_models, tmp_path):
    joint = joint_recipe([_recipe(tiny_models["sd1"], p, tmp_path) for p in ("a red shape", "a blue shape")])
    assert joint.concept.prompts == ["a red shape", "a blue shape"] and joint.concept.preserve == []
    assert joint.train.steps == 4
    erase_from = _recipe(tiny_models["sd1"], "red", tmp_path)
    erase_from.concept.erase_from = ["a circle"]
    with pytest.raises(RecipeError, match="erase_from"):
        joint_recipe([erase_from])
