import pytest

from esd_lora.recipe import RecipeError, dump_recipe, from_dict, load_recipe

BASE = {"concept": {"prompts": ["a red shape"]}}


def test_defaults_numbers_as_strings_and_overrides(tmp_path):
    path = tmp_path / "red.yaml"
    path.write_text("concept:\n  prompts: a red shape\n  eta: 2\ntrain:\n  lr: 1e-4\n  mixed_precision: no\n")
    recipe = load_recipe(path, ["train.steps=7", "adapter.targets=[attn2.to_k]", "output.dir=somewhere"])
    assert recipe.name == "red" and recipe.concept.prompts == ["a red shape"]
    assert recipe.train.lr == 1e-4 and isinstance(recipe.train.lr, float)
    assert recipe.train.mixed_precision == "no" and recipe.train.steps == 7
    assert recipe.adapter.targets == ["attn2.to_k"] and str(recipe.output_dir) == "somewhere"
    assert load_recipe(path).output_dir.as_posix() == "runs/red"  # never the shipped adapters/
    again = from_dict(__import__("yaml").safe_load(dump_recipe(recipe)))
    assert again == recipe


def test_adapter_none_is_classic_mode():
    assert from_dict({**BASE, "adapter": "none"}).adapter.kind == "none"
    assert from_dict(BASE, ["adapter=none"]).adapter.kind == "none"


@pytest.mark.parametrize("data, overrides, key", [
    ({**BASE, "trian": {}}, [], "trian"),
    ({**BASE, "train": {"stpes": 3}}, [], "train.stpes"),
    ({**BASE, "train": {"lr": "fast"}}, [], "train.lr"),
    ({**BASE, "train": {"steps": 2.5}}, [], "train.steps"),
    ({**BASE, "train": {"optimizer": "lion"}}, [], "train.optimizer"),
    ({**BASE, "train": {"mixed_precision": "fp8"}}, [], "train.mixed_precision"),
    ({**BASE, "adapter": {"rank": 0}}, [], "adapter.rank"),
    ({**BASE, "adapter": {"dropout": 1.5}}, [], "adapter.dropout"),
    ({**BASE, "adapter": "sometimes"}, [], "adapter.kind"),
    ({**BASE, "concept": {"prompts": []}}, [], "concept.prompts"),
    ({**BASE, "concept": {"prompts": ["x"], "eta": -1}}, [], "concept.eta"),
    ({**BASE, "concept": {"prompts": ["a red circle", "a red disk", "a red disc"],
                          "erase_from": ["a circle", "a disk"]}}, [], "concept.erase_from"),
    ({**BASE, "model": {"dtype": "int8"}}, [], "model.dtype"),
    ({**BASE, "train": {"gradient_checkpointing": "maybe"}}, [], "train.gradient_checkpointing"),
    ({**BASE, "train": {"refresh_every": 0}}, [], "train.refresh_every"),
    ({**BASE, "model": {"dtype": "fp16"}, "train": {"mixed_precision": "bf16"}}, [], "train.mixed_precision"),
    ({**BASE, "model": {"dtype": "bf16"}, "train": {"mixed_precision": "fp16"}}, [], "train.mixed_precision"),
    (BASE, ["train.steps"], "train.steps"),
    (BASE, ["train.steps=-3"], "train.steps"),
    (BASE, ["a.b.c=1"], "a.b.c"),
])
def test_errors_are_one_line_and_name_the_key(data, overrides, key):
    with pytest.raises(RecipeError) as err:
        from_dict(data, overrides)
    message = str(err.value)
    assert key in message and "\n" not in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(RecipeError, match="no such file"):
        load_recipe(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("concept: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_contexts_place_every_prompt_in_every_template_and_the_concept_leaves_the_preserve_list():
    recipe = from_dict({"concept": {"prompts": ["red", "crimson"], "preserve": ["red", "blue", "green"],
                                    "contexts": ["{} star", "a photo of a {} circle"]}})
    trained = recipe.concept.trained()
    assert trained.prompts == ["red star", "a photo of a red circle", "crimson star", "a photo of a crimson circle"]
    assert trained.preserve == ["blue star", "a photo of a blue circle", "green star", "a photo of a green circle"]
    assert recipe.concept.contexts and not trained.contexts
    subject = from_dict({"concept": {"prompts": ["a red circle", "a red disk"], "erase_from": ["a circle", "a disk"],
                                     "contexts": ["{}", "one single {}"]}}).concept.trained()
    assert [subject.subject(i) for i in range(4)] == ["a circle", "one single a circle", "a disk", "one single a disk"]
    plain = from_dict(BASE).concept
    assert plain.trained() == plain  # no contexts: exactly the recipe's prompts


def test_every_shipped_toy_recipe_reads():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "recipes" / "toy").glob("*.yaml")):
        assert load_recipe(path).concept.trained().prompts, path.name
