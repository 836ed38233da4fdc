import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from esd_lora import train as train_module
from esd_lora.adapter import WEIGHTS_NAME, load_adapters
from esd_lora.errors import EsdLoraError
from esd_lora.models import load_pipeline
from esd_lora.provenance import read_metadata, unet_sha256
from esd_lora.recipe import RecipeError, from_dict
from esd_lora.train import lr_factor, make_optimizer, train


def recipe_for(model, out, **train_keys):
    return from_dict({
        "model": {"id": str(model)},
        "concept": {"prompts": ["a red shape", "a crimson shape"], "preserve": ["a blue shape"]},
        "train": {"steps": 3, "ddim_steps": 10, **train_keys},
        "output": {"dir": str(out), "checkpoint_every": 2},
    })


def test_trains_every_family_and_writes_a_loadable_adapter_with_provenance(tiny_model, tmp_path):
    family, path = tiny_model
    summary = train(recipe_for(path, tmp_path / "a", sampler="frozen" if family == "sd2" else "trained"),
                    progress=False)
    out = tmp_path / "a"
    assert summary["steps"] == 3 and summary["peak_memory_mb"] > 0
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "log.jsonl", WEIGHTS_NAME, "recipe.yaml", "summary.json"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] >= 0 for r in log)
    meta = read_metadata(out / WEIGHTS_NAME)
    pipe = load_pipeline(str(path))
    assert meta["esd_lora.base_unet_sha256"] == unet_sha256(pipe)
    assert json.loads(meta["esd_lora.concepts"]) == ["a red shape", "a crimson shape"]
    assert meta["esd_lora.eta"] == "1.0" and meta["esd_lora.steps"] == "3" and meta["esd_lora.base_model"] == str(path)
    assert "diffusers" in json.loads(meta["esd_lora.versions"])
    assert all(".attn2." in m for m in json.loads(meta["esd_lora.targets"]))
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 4.0
    weights = load_file(str(out / WEIGHTS_NAME))
    assert weights and all(k.startswith("unet.") and "lora_" in k for k in weights)
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)  # it trained
    load_adapters(pipe, [out])  # diffusers' own loader reads it back


def test_classic_mode_trains_the_selected_weights_directly(tiny_models, tmp_path):
    recipe = recipe_for(tiny_models["sd1"], tmp_path / "c", optimizer="adam")
    recipe.adapter.kind = "none"
    train(recipe, progress=False)
    weights = load_file(str(tmp_path / "c" / "esd_weights.safetensors"))
    base = load_pipeline(str(tiny_models["sd1"])).unet.state_dict()
    assert weights and all(".attn2." in k for k in weights)
    assert any(not torch.equal(v, base[k]) for k, v in weights.items())


# refresh 3: the resumed run goes on with the checkpointed trajectories (of two images, or of two images and
# two of the preserve prompt's own, also with `both`); robust: and with the attacker's tokens (refitted every 3 steps)
# text: the text encoder is adapted too (`tokens`: its concept rows, at their own lr), and its adapter is
# checkpointed with the UNet's
# pool: the robust run keeps its earlier attackers (attack.pool), which the checkpoint carries
# new words: the soft prompt restarts from new words (attack.new_words), the same ones after the resume
@pytest.mark.parametrize("refresh_every,batch,preserve_on,robust,text,pool,new_words", [
    (1, 1, "erased", [], "", 0, False), (1, 1, "own", [], "", 0, False), (3, 2, "erased", [], "", 0, False),
    (3, 2, "own", [], "", 0, False), (3, 2, "both", ["ti"], "", 0, False), (3, 2, "erased", ["ti"], "", 0, False),
    (1, 1, "erased", ["ti", "soft-prompt"], "", 0, False), (3, 2, "erased", ["ti"], "attn", 0, False),
    (3, 2, "erased", ["ti"], "tokens", 0, False), (1, 1, "erased", ["ti"], "", 4, False),
    (1, 1, "erased", ["soft-prompt"], "", 0, True)])
def test_resume_reaches_the_same_adapter_as_an_uninterrupted_run(tiny_models, tmp_path, monkeypatch, refresh_every,
                                                                  batch, preserve_on, robust, text, pool, new_words):
    def recipe(name):
        r = recipe_for(tiny_models["sd1"], tmp_path / name, steps=5, refresh_every=refresh_every, batch=batch)
        r.concept.preserve_on = preserve_on
        if text == "tokens":
            r.adapter.concept_tokens, r.train.token_lr = True, 3e-4
        else:
            r.adapter.text_encoder = text
        if robust:
            r.attack.methods, r.attack.every, r.attack.steps, r.attack.images, r.attack.batch = robust, 1, 2, 3, 2
            # the resumed run restarts the attackers when the first one did; with a pool, from the second refit
            # on, so that the checkpoint holds one earlier attacker
            r.attack.restart_every, r.attack.pool, r.attack.new_words = (1 if pool else 2), pool, new_words
        return r

    train(recipe("full"), progress=False)

    real_save = train_module._save_checkpoint

    def save_then_die(*args):
        real_save(*args)
        raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(recipe("resumed"), progress=False)
    monkeypatch.setattr(train_module, "_save_checkpoint", real_save)
    assert not (tmp_path / "resumed" / WEIGHTS_NAME).exists()
    with pytest.raises(RecipeError, match="--resume"):
        train(recipe("resumed"), progress=False)
    train(recipe("resumed"), resume=True, progress=False)

    full = load_file(str(tmp_path / "full" / WEIGHTS_NAME))
    resumed = load_file(str(tmp_path / "resumed" / WEIGHTS_NAME))
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    log = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5]


def test_robust_erasure_trains_against_the_attackers_prompts_and_still_writes_a_plain_unet_lora(tiny_models,
                                                                                               tmp_path):
    plain = recipe_for(tiny_models["sd1"], tmp_path / "plain")
    robust = recipe_for(tiny_models["sd1"], tmp_path / "robust")
    robust.attack.methods, robust.attack.steps, robust.attack.images = ["ti"], 2, 4
    train(plain, progress=False)
    train(robust, progress=False)
    a, b = (load_file(str(tmp_path / name / WEIGHTS_NAME)) for name in ("plain", "robust"))
    assert a.keys() == b.keys() and all(k.startswith("unet.") for k in b)  # the same layers: it merges the same
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the attacker's prompts changed the training
    assert "attack:\n  methods:\n  - ti" in (tmp_path / "robust" / "recipe.yaml").read_text()


def test_robust_erasure_can_train_each_latent_under_the_attackers_prompt_in_its_own_context(tiny_models, tmp_path,
                                                                                             monkeypatch):
    from esd_lora.adversary import Adversary

    said, prompts_for = [], Adversary.prompts_for

    def spy(self, picks, rng):
        prompts = prompts_for(self, picks, rng)
        if self.section.context == "own":
            said.append(prompts)
        return prompts

    monkeypatch.setattr(Adversary, "prompts_for", spy)
    runs = {}
    for context in ("any", "own"):
        recipe = recipe_for(tiny_models["sd1"], tmp_path / context)
        recipe.concept.prompts, recipe.concept.contexts = ["red", "crimson"], ["a {} star", "{} shape"]
        recipe.attack.methods, recipe.attack.steps, recipe.attack.images = ["ti", "soft-prompt"], 2, 4
        recipe.attack.context = context
        train(recipe, progress=False)
        runs[context] = load_file(str(tmp_path / context / WEIGHTS_NAME))
    assert any(not torch.equal(runs["any"][k], runs["own"][k]) for k in runs["any"])
    assert len(said) == 2 * 3  # both attackers, every step
    ti, soft = "<esd-robust-ti>", "<esd-robust-soft-prompt>"
    assert all(p in (f"a {ti} star", f"{ti} shape") for prompts in said[::2] for p in prompts)
    assert all(p in (f"{soft} a red star", f"{soft} red shape", f"{soft} a crimson star", f"{soft} crimson shape")
               for prompts in said[1::2] for p in prompts)


def test_robust_erasure_can_pull_each_attackers_prompt_to_what_the_teacher_draws_under_it_less_the_concept(
        tiny_models, tmp_path, monkeypatch):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from esd_lora.adversary import Adversary

    calls, condition = [], Adversary.condition

    def spy(self, prompts, grad=False, vectors=None):
        layers = [m for m in self.tokens.pipe.text_encoder.modules() if isinstance(m, BaseTunerLayer)]
        calls.append((grad, all(layer.disable_adapters for layer in layers)))
        return condition(self, prompts, grad, vectors)

    monkeypatch.setattr(Adversary, "condition", spy)
    runs = {}
    for target in ("concept", "attacker"):
        recipe = recipe_for(tiny_models["sd1"], tmp_path / target)
        recipe.adapter.concept_tokens = True
        recipe.attack.methods, recipe.attack.steps, recipe.attack.images = ["ti"], 2, 4
        recipe.attack.target = target
        train(recipe, progress=False)
        runs[target] = load_file(str(tmp_path / target / WEIGHTS_NAME))
    assert any(not torch.equal(runs["concept"][k], runs["attacker"][k]) for k in runs["concept"])
    # concept: the student's conditioning only, through the retrained rows; attacker: then the teacher's, without
    assert calls == [(True, False)] * 3 + [(True, False), (False, True)] * 3


def test_robust_erasure_takes_the_attackers_eta_from_the_concept_unless_it_is_given(tiny_models, tmp_path):
    runs = {}
    for eta in (None, 1.0, 0.0):
        recipe = recipe_for(tiny_models["sd1"], tmp_path / str(eta))
        recipe.concept.eta = 1.0
        recipe.attack.methods, recipe.attack.steps, recipe.attack.images = ["ti"], 2, 4
        recipe.attack.eta = eta
        train(recipe, progress=False)
        runs[eta] = load_file(str(tmp_path / str(eta) / WEIGHTS_NAME))
    assert all(torch.equal(runs[None][k], runs[1.0][k]) for k in runs[None])
    assert any(not torch.equal(runs[None][k], runs[0.0][k]) for k in runs[None])


def test_a_text_encoder_adapter_trains_beside_the_unets_and_is_saved_where_diffusers_reads_it(tiny_models, tmp_path):
    from esd_lora.models import Conditioner

    recipe = recipe_for(tiny_models["sd1"], tmp_path / "te")
    recipe.adapter.text_encoder = "all"
    recipe.attack.methods, recipe.attack.steps, recipe.attack.images = ["ti"], 2, 4
    train(recipe, progress=False)
    weights = load_file(str(tmp_path / "te" / WEIGHTS_NAME))
    text = {k: v for k, v in weights.items() if k.startswith("text_encoder.text_model.encoder.layers.")}
    assert any(v.abs().max() > 0 for k, v in text.items() if "lora_B" in k)  # it trained
    assert any(k.startswith("unet.") for k in weights) and len(text) == 2 * 6 * 2  # 2 layers, 6 projections, A/B
    targets = json.loads(read_metadata(tmp_path / "te" / WEIGHTS_NAME)["esd_lora.targets"])
    assert "text_encoder.encoder.layers.1.mlp.fc2" in targets
    pipe, base = load_pipeline(str(tiny_models["sd1"])), load_pipeline(str(tiny_models["sd1"]))
    load_adapters(pipe, [tmp_path / "te"])
    embeds = [Conditioner(p, "cpu", torch.float32)(["a red shape"])["encoder_hidden_states"] for p in (pipe, base)]
    assert (embeds[0] - embeds[1]).abs().max() > 0


def test_a_text_encoder_adapter_is_refused_in_one_line_where_it_cannot_go(tiny_models, tmp_path):
    recipe = recipe_for(tiny_models["sdxl"], tmp_path / "x")
    recipe.adapter.text_encoder = "attn"
    with pytest.raises(EsdLoraError, match="adapter.text_encoder: .*single-text-encoder"):
        train(recipe, progress=False)
    recipe = recipe_for(tiny_models["sd1"], tmp_path / "y")
    recipe.adapter.text_encoder = "conv_.*"
    with pytest.raises(EsdLoraError, match="adapter.text_encoder: 'conv_.\\*' selects no Linear"):
        train(recipe, progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y" / WEIGHTS_NAME).exists()


def test_optimizer_falls_back_to_adamw_with_one_warning(monkeypatch, capsys):
    params = [torch.nn.Parameter(torch.zeros(8))]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, as where bitsandbytes cannot run
    opt = make_optimizer("adamw8bit", params, 1e-3)
    assert type(opt) is torch.optim.AdamW
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "using torch AdamW" in err[0]


def test_adamw8bit_is_used_where_bitsandbytes_runs():
    bnb = pytest.importorskip("bitsandbytes")
    opt = make_optimizer("adamw8bit", [torch.nn.Parameter(torch.zeros(8192))], 1e-3)
    assert isinstance(opt, bnb.optim.AdamW8bit)


def test_mixed_precision_trains_fp32_adapter_weights_on_bf16_base_weights(tiny_models, tmp_path):
    from accelerate.state import AcceleratorState

    dtypes, autocast = [], set()

    def on_step(step, pipe):  # as the model is while it trains
        params = dict(pipe.unet.named_parameters())
        dtypes.append(({p.dtype for n, p in params.items() if p.requires_grad},
                       {p.dtype for n, p in params.items() if not p.requires_grad and "lora_" not in n}))
        if step == 1:  # during the next step, is each UNet call under bf16 autocast?
            pipe.unet.register_forward_pre_hook(lambda *_: autocast.add(
                torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))

    AcceleratorState._reset_state(True)
    recipe = recipe_for(tiny_models["sd1"], tmp_path / "bf16", steps=2, mixed_precision="bf16")
    recipe.model.dtype = "bf16"
    try:
        train(recipe, progress=False, on_step=on_step)
    finally:
        AcceleratorState._reset_state(True)
    assert dtypes == [({torch.float32}, {torch.bfloat16})] * 2
    assert autocast == {False, torch.bfloat16}  # the teacher and the sampler without, the trained model with
    weights = load_file(str(tmp_path / "bf16" / WEIGHTS_NAME))
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)  # the fp32 weights did move


def test_on_step_sees_the_training_pipeline_and_can_stop_early(tiny_models, tmp_path):
    seen = []

    def on_step(step, pipe):
        seen.append((step, any("lora_A" in n for n, _ in pipe.unet.named_parameters())))
        return step == 2

    summary = train(recipe_for(tiny_models["sd1"], tmp_path / "a", steps=5), progress=False, on_step=on_step)
    assert seen == [(1, True), (2, True)] and summary["steps"] == 2
    assert read_metadata(tmp_path / "a" / WEIGHTS_NAME)["esd_lora.steps"] == "2"
    assert "steps: 2" in (tmp_path / "a" / "recipe.yaml").read_text()


def test_learning_rate_warms_up_then_decays_to_zero_or_stays():
    cosine = from_dict({"concept": {"prompts": ["x"]},
                        "train": {"steps": 10, "lr": 1.0, "warmup_steps": 2, "lr_schedule": "cosine"}}).train
    lrs = [lr_factor(cosine, s) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and all(a > b for a, b in zip(lrs[2:], lrs[3:])) and 0 < lrs[-1] < 0.05
    cosine.lr_schedule = "constant"
    assert [lr_factor(cosine, s) for s in range(10)] == [0.5] + [1.0] * 9


def test_a_finished_adapter_is_replaced_only_when_asked(tiny_models, tmp_path):
    train(recipe_for(tiny_models["sd1"], tmp_path / "a", steps=1), progress=False)
    before = (tmp_path / "a" / WEIGHTS_NAME).read_bytes()
    with pytest.raises(RecipeError, match="already holds an adapter; pass --overwrite"):
        train(recipe_for(tiny_models["sd1"], tmp_path / "a", steps=1, seed=1), progress=False)
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() == before
    train(recipe_for(tiny_models["sd1"], tmp_path / "a", steps=1, seed=1), progress=False, overwrite=True)
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() != before


def test_fp16_autocast_on_a_cpu_says_in_one_line_that_it_computes_in_the_weights_dtype(tiny_models, tmp_path, capsys):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    try:
        train(recipe_for(tiny_models["sd1"], tmp_path / "fp16", steps=1, mixed_precision="fp16"), progress=False)
    finally:
        AcceleratorState._reset_state(True)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "mixed_precision" in line]
    assert len(warnings) == 1 and "needs a GPU" in warnings[0] and "model.dtype fp32" in warnings[0]


def test_concept_tokens_retrain_only_the_concepts_words_and_leave_every_other_prompt_as_it_was(tiny_models, tmp_path):
    from esd_lora.models import Conditioner

    recipe = recipe_for(tiny_models["sd1"], tmp_path / "tok", lr=0.05)
    recipe.adapter.concept_tokens = True
    train(recipe, progress=False)
    weights = load_file(str(tmp_path / "tok" / WEIGHTS_NAME))
    rows = weights["text_encoder.text_model.embeddings.token_embedding.trainable_tokens_delta"]
    pipe, base = load_pipeline(str(tiny_models["sd1"])), load_pipeline(str(tiny_models["sd1"]))
    words = sorted(pipe.tokenizer.convert_tokens_to_ids(["red", "crimson"]))  # "a", "shape" are in the preserve prompt
    assert rows.shape == (2, pipe.text_encoder.config.hidden_size)
    assert not torch.allclose(rows, base.text_encoder.get_input_embeddings().weight[words])  # it trained
    assert json.loads(read_metadata(tmp_path / "tok" / WEIGHTS_NAME)["esd_lora.targets"])[-1] == \
        "text_encoder.embeddings.token_embedding"
    load_adapters(pipe, [tmp_path / "tok"])
    for prompt, changed in (("a blue shape", False), ("a crimson star", True)):
        embeds = [Conditioner(p, "cpu", torch.float32)([prompt])["encoder_hidden_states"] for p in (pipe, base)]
        assert torch.equal(*embeds) is not changed


def test_retrained_token_rows_train_at_their_own_lr(tiny_models, tmp_path):
    recipe = recipe_for(tiny_models["sd1"], tmp_path / "slow", lr=1e-2)
    recipe.adapter.concept_tokens, recipe.train.token_lr = True, 1e-8
    train(recipe, progress=False)
    weights = load_file(str(tmp_path / "slow" / WEIGHTS_NAME))
    rows = weights["text_encoder.text_model.embeddings.token_embedding.trainable_tokens_delta"]
    pipe = load_pipeline(str(tiny_models["sd1"]))
    base = pipe.text_encoder.get_input_embeddings().weight[sorted(pipe.tokenizer.convert_tokens_to_ids(["red", "crimson"]))]
    assert (rows - base).abs().max() < 1e-6  # Adam moves a weight by about its lr per step: 3 steps of 1e-8
    assert any(v.abs().max() > 1e-3 for k, v in weights.items() if "lora_B" in k)  # the LoRA at train.lr


def test_at_lr_0_the_rows_alone_train_and_the_lora_stays_zero(tiny_models, tmp_path):
    recipe = recipe_for(tiny_models["sd1"], tmp_path / "rows", lr=1e-2)
    recipe.adapter.concept_tokens, recipe.train.lr, recipe.train.token_lr = True, 0.0, 1e-2
    train(recipe, progress=False)
    weights = load_file(str(tmp_path / "rows" / WEIGHTS_NAME))
    rows = weights["text_encoder.text_model.embeddings.token_embedding.trainable_tokens_delta"]
    pipe = load_pipeline(str(tiny_models["sd1"]))
    words = sorted(pipe.tokenizer.convert_tokens_to_ids(["red", "crimson"]))
    base = pipe.text_encoder.get_input_embeddings().weight[words]
    assert (rows - base).abs().max() > 1e-3  # the rows trained at token_lr
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(v) == 0 for v in lora_b)  # the LoRA as initialised: no change
