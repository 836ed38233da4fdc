import dataclasses
import random

import torch
from diffusers import DDIMScheduler

from esd_lora.adapter import ADAPTER_NAME, lora_config, select_modules
from esd_lora.adversary import Adversary, LearnedTokens, TokenFit, image_latents, random_embeddings, word_embeddings
from esd_lora.models import load_pipeline
from esd_lora.recipe import AttackSection
from esd_lora.sample import generate


def test_a_token_set_to_a_words_embedding_conditions_exactly_as_the_word(tiny_models):
    pipe = load_pipeline(str(tiny_models["sd1"]))
    tokens = LearnedTokens(pipe, word_embeddings(pipe, ["red"]))
    with torch.no_grad():
        said = pipe.encode_prompt("a red star", "cpu", 1, do_classifier_free_guidance=False)[0]
        learned = tokens.encode([f"a {tokens.text} star"])
    assert torch.equal(learned, said)
    seeds = [3, 4]
    by_word = generate(pipe, ["a red star"] * 2, seeds, steps=3, progress=False)
    by_token = generate(pipe, [f"a {tokens.text} star"] * 2, seeds, steps=3, progress=False)
    assert torch.equal(by_word, by_token)  # the pipeline samples with the token like with the word
    tokens.remove()
    assert not torch.equal(generate(pipe, [f"a {tokens.text} star"] * 2, seeds, steps=3, progress=False), by_word)


def test_fitting_tokens_moves_only_the_tokens_and_lowers_their_loss(tiny_models):
    pipe = load_pipeline(str(tiny_models["sd1"]))
    unet = pipe.unet
    unet.add_adapter(lora_config(2, 2.0, 0.0, "default", select_modules(unet, "esd-x")), adapter_name=ADAPTER_NAME)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    tokens = LearnedTokens(pipe, word_embeddings(pipe, ["blue", "blue"]))
    start = tokens.vectors.detach().clone()
    x0 = image_latents(pipe, torch.rand(8, 3, 32, 32) * 2 - 1)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    fit = TokenFit([f"a {tokens.text} circle"] * 8, lr=5e-2, batch=8)

    def mean_loss():  # over the same 16 noise draws, before and after
        return sum(_loss(tokens, unet, scheduler, x0, fit.captions[0], seed) for seed in range(16)) / 16

    first = mean_loss()
    fit.run(tokens, unet, scheduler, x0, 60, torch.Generator().manual_seed(0))
    assert mean_loss() < first
    assert not torch.equal(tokens.vectors, start)
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())
    assert all(p.grad is None for p in unet.parameters())  # the model's own gradients are never touched


def _loss(tokens, unet, scheduler, x0, prompt, seed):
    from esd_lora.adversary import denoising_loss

    with torch.no_grad():
        cond = tokens.encode([prompt] * len(x0))
        return float(denoising_loss(unet, scheduler, x0, cond, torch.Generator().manual_seed(seed)))


def test_the_robust_attacker_saves_and_restores_its_tokens_and_conditions_its_prompts(tiny_models):
    pipe = load_pipeline(str(tiny_models["sd1"]))
    section = AttackSection(methods=["ti"], tokens=2, steps=2, batch=2, restart_every=2)
    x0 = torch.randn(4, 4, 8, 8)
    adversary = Adversary(pipe, "ti", section, "red", x0, ["a {} star", "{} shape", "a {} star", "{} shape"], seed=0)
    names = adversary.tokens.text
    assert names == "<esd-robust-ti>" and adversary.tokens.names == ["<esd-robust-ti>", "<esd-robust-ti>_1"]
    assert adversary.fit.captions == [f"a {names} star", f"{names} shape"] * 2  # one per latent, in order
    assert adversary.prompts == [f"{names} shape", f"a {names} star"]
    state, key = adversary.state(), "<esd-robust-ti>"
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    adversary.refresh(pipe.unet, scheduler, torch.Generator().manual_seed(0), index=1)
    assert list(state) == [key] and state[key].shape == (2, 16)
    moved = adversary.state()[key]
    assert not torch.equal(moved, state[key])
    adversary.refresh(pipe.unet, scheduler, torch.Generator().manual_seed(0), index=2)  # restarts, then refits
    assert torch.equal(adversary.state()[key], moved)  # the same refit from the same start, same noise
    adversary.load_state(state)
    assert torch.equal(adversary.state()[key], state[key])
    cond = adversary.condition(adversary.prompts_for([0, 1, 1], random.Random(0)))["encoder_hidden_states"]
    assert cond.shape[0] == 3 and not cond.requires_grad
    assert adversary.pool == [] and adversary.past(random.Random(0)) is None  # attack.pool 0 keeps none
    soft = Adversary(pipe, "soft-prompt", AttackSection(tokens=3), "a red shape", x0, ["a red shape"] * 4, seed=0)
    assert soft.prompts == ["<esd-robust-soft-prompt> a red shape"] and len(soft.tokens.names) == 3


def test_the_robust_soft_prompt_restarts_from_new_words_not_the_audits_draw(tiny_models):
    pipe = load_pipeline(str(tiny_models["sd1"]))
    # steps 0: no refit, so the tokens stay where a start put them
    section = AttackSection(methods=["soft-prompt"], tokens=3, steps=0, batch=2, restart_every=2, new_words=True)
    soft = Adversary(pipe, "soft-prompt", section, "a red shape", torch.randn(2, 4, 8, 8), ["a red shape"] * 2,
                     seed=0)
    assert not any(torch.equal(soft.init, random_embeddings(pipe, 3, seed)) for seed in range(5))  # audit's seeds
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    soft.refresh(pipe.unet, scheduler, torch.Generator(), index=3)  # no restart: the first start's words stay
    assert torch.equal(soft.tokens.vectors, soft.init)
    soft.refresh(pipe.unet, scheduler, torch.Generator(), index=4)  # the second restart
    assert torch.equal(soft.tokens.vectors, soft.words(2)) and not torch.equal(soft.words(2), soft.words(1))
    same = Adversary(pipe, "soft-prompt", dataclasses.replace(section, new_words=False), "a red shape",
                     torch.randn(2, 4, 8, 8), ["a red shape"] * 2, seed=0)
    assert torch.equal(same.init, random_embeddings(pipe, 3, 0))  # off: the words of `attack --seed` train.seed


def test_the_robust_attacker_says_each_latents_own_context_when_asked(tiny_models):
    pipe = load_pipeline(str(tiny_models["sd1"]))
    x0, section = torch.randn(2, 4, 8, 8), AttackSection(methods=["ti"], context="own")
    adversary = Adversary(pipe, "ti", section, "red", x0, ["a {} star", "a {} star"], seed=0,
                          own=["a {} star", "a {} circle"])
    token = adversary.tokens.text
    assert adversary.own == [f"a {token} star", f"a {token} circle"]

    assert adversary.prompts_for([1, 0, 1], random.Random(0)) == [f"a {token} circle", f"a {token} star",
                                                                  f"a {token} circle"]
    section.context = "any"  # the fitted captions only, whatever the latents' prompts
    assert adversary.prompts_for([1, 1], random.Random(0)) == [f"a {token} star"] * 2
    assert adversary.condition([f"a {token} star"], grad=True)["encoder_hidden_states"].requires_grad


def test_new_tokens_leave_an_erasures_retrained_concept_rows_in_place(tiny_models, tiny_adapters):
    from esd_lora.adapter import load_adapters

    pipe, base = load_pipeline(str(tiny_models["sd1"])), load_pipeline(str(tiny_models["sd1"]))
    load_adapters(pipe, [tiny_adapters["red_tokens"]])

    def encode(p, prompt):
        with torch.no_grad():
            return p.encode_prompt(prompt, "cpu", 1, do_classifier_free_guidance=False)[0]

    erased = encode(pipe, "a crimson star")
    assert not torch.equal(erased, encode(base, "a crimson star"))
    tokens = LearnedTokens(pipe, word_embeddings(pipe, ["crimson"]))  # the table grows by a row for the token
    assert torch.equal(encode(pipe, "a crimson star"), erased)
    with torch.no_grad():  # the attacker starts from the word as the base reads it: the erasure's row is undone
        assert torch.equal(tokens.encode([f"a {tokens.text} star"]), encode(base, "a crimson star"))


def test_the_robust_attacker_keeps_its_latest_earlier_attackers_and_conditions_with_them(tiny_models):
    pipe = load_pipeline(str(tiny_models["sd1"]))
    section = AttackSection(methods=["ti"], steps=2, batch=2, restart_every=1, pool=2)
    adversary = Adversary(pipe, "ti", section, "red", torch.randn(2, 4, 8, 8), ["a {} star"] * 2, seed=0)
    scheduler, key = DDIMScheduler.from_config(pipe.scheduler.config), "<esd-robust-ti>"
    fitted = []
    for index in range(4):  # every refit after the first restarts, so each keeps the one before
        adversary.refresh(pipe.unet, scheduler, torch.Generator().manual_seed(index), index)
        fitted.append(adversary.state()[key])
    assert len(adversary.pool) == 2  # the latest two
    assert all(torch.equal(p, f) for p, f in zip(adversary.pool, fitted[1:3]))
    assert torch.equal(adversary.past(random.Random(0)), random.Random(0).choice(adversary.pool))
    prompt = [f"a {adversary.tokens.text} star"]
    now, then = (adversary.condition(prompt, vectors=v)["encoder_hidden_states"] for v in (None, adversary.pool[0]))
    assert not torch.equal(now, then)
    assert torch.equal(adversary.condition(prompt)["encoder_hidden_states"], now)  # the learned tokens are back
    state = adversary.state()
    assert state[key + ".pool"].shape == (2, 1, 16)
    restored = Adversary(pipe, "ti", section, "red", torch.randn(2, 4, 8, 8), ["a {} star"] * 2, seed=0)
    restored.load_state(state)
    assert all(torch.equal(a, b) for a, b in zip(restored.pool, adversary.pool)) and len(restored.pool) == 2
