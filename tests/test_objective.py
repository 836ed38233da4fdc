import torch

from esd_lora.adapter import ADAPTER_NAME, lora_config, select_modules
from esd_lora.models import load_pipeline
from esd_lora.objective import adapters_off, esd_loss, esd_target


def test_target_matches_a_hand_computed_case():
    concept = torch.tensor([3.0, 5.0])
    empty = torch.tensor([1.0, 2.0])
    assert torch.equal(esd_target(concept, empty, eta=1.0), torch.tensor([-1.0, -1.0]))
    assert torch.equal(esd_target(concept, empty, eta=2.0), torch.tensor([-3.0, -4.0]))
    subject = torch.tensor([2.5, 4.5])  # erase_from: only what c adds to the subject is reversed
    assert torch.equal(esd_target(concept, subject, eta=1.0), torch.tensor([2.0, 4.0]))


def test_loss_on_a_tiny_network_equals_the_hand_derivation():
    # eps(x, c) = x + c: the student starts as the teacher, so the loss is ((1 + eta) * (c - e))^2.
    x = torch.randn(2, 4)
    c, e = torch.full((2, 4), 0.3), torch.full((2, 4), -0.1)
    net = lambda x, cond: x + cond  # noqa: E731
    eta = 1.5
    loss = esd_loss(net(x, c), esd_target(net(x, c), net(x, e), eta))
    assert torch.allclose(loss, torch.tensor(((1 + eta) * 0.4) ** 2))


def test_target_means_the_same_for_epsilon_and_v_prediction():
    torch.manual_seed(0)
    alpha_bar = torch.tensor(0.3)
    x_t = torch.randn(3, 4)
    eps = {k: torch.randn(3, 4) for k in ("concept", "empty")}
    x0 = {k: (x_t - (1 - alpha_bar).sqrt() * v) / alpha_bar.sqrt() for k, v in eps.items()}
    v = {k: alpha_bar.sqrt() * eps[k] - (1 - alpha_bar).sqrt() * x0[k] for k in eps}
    target_eps = esd_target(eps["concept"], eps["empty"], 2.0)
    target_v = esd_target(v["concept"], v["empty"], 2.0)
    # v -> eps on the same x_t: eps = sqrt(a) v + sqrt(1 - a) x_t
    assert torch.allclose(alpha_bar.sqrt() * target_v + (1 - alpha_bar).sqrt() * x_t, target_eps, atol=1e-5)


def test_teacher_is_the_base_bit_for_bit(tiny_model):
    _, path = tiny_model
    pipe = load_pipeline(str(path))
    unet = pipe.unet
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 700])
    kwargs = {"encoder_hidden_states": torch.randn(2, 5, unet.config.cross_attention_dim)}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pipe.text_encoder_2.config.projection_dim),
                                     "time_ids": torch.ones(2, 6)}
    with torch.no_grad():
        base = unet(x, t, **kwargs).sample
        unet.add_adapter(lora_config(2, 2.0, 0.0, "default", select_modules(unet, "esd-all")),
                         adapter_name=ADAPTER_NAME)
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_()
        with adapters_off(unet):
            off = unet(x, t, **kwargs).sample
        on = unet(x, t, **kwargs).sample
    assert torch.equal(off, base)
    assert not torch.allclose(on, base)


def _esd_step(pipe, concept, batch):
    from diffusers import DDIMScheduler

    from esd_lora.models import Conditioner
    from esd_lora.objective import EsdStep

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return EsdStep(concept, Conditioner(pipe, "cpu", torch.float32), scheduler, batch)


def _trained_pipe(tiny_models):
    """The tiny SD 1.x pipeline with a random esd-x adapter on: a trained model that differs from its teacher."""
    pipe = load_pipeline(str(tiny_models["sd1"]))
    unet = pipe.unet
    unet.add_adapter(lora_config(2, 2.0, 0.0, "default", select_modules(unet, "esd-x")), adapter_name=ADAPTER_NAME)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return pipe, unet


def test_esd_step_pulls_the_concept_to_the_target_and_keeps_the_preserve_prompts(tiny_models):
    import random

    from contextlib import nullcontext

    from esd_lora.latents import LatentBatch
    from esd_lora.recipe import ConceptSection

    pipe, unet = _trained_pipe(tiny_models)
    concept = ConceptSection(prompts=["a red circle", "a red square"], erase_from=["a circle", "a square"], eta=1.5,
                             preserve=["a blue circle"], preserve_weight=3.0)
    esd = _esd_step(pipe, concept, batch=2)
    torch.manual_seed(1)
    latents = LatentBatch(torch.randn(2, 4, 8, 8), ks=[3, 7], picks=[1, 0])
    t = torch.tensor([300, 700])
    loss = esd.loss(unet, lambda: adapters_off(unet), latents, t, random.Random(0), nullcontext)

    def eps(prompts, on):
        with torch.no_grad(), (nullcontext() if on else adapters_off(unet)):
            return unet(latents.x, t, **esd.conditioner(prompts)).sample

    target = esd_target(eps(["a red square", "a red circle"], False), eps(["a square", "a circle"], False), 1.5)
    expected = esd_loss(eps(["a red square", "a red circle"], True), target) + 3.0 * esd_loss(
        eps(["a blue circle"] * 2, True), eps(["a blue circle"] * 2, False))
    assert torch.allclose(loss, expected, rtol=1e-4)
    loss.backward()
    assert all(p.grad is not None for n, p in unet.named_parameters() if "lora_" in n)


def test_preserve_on_own_latents_uses_the_preserve_images(tiny_models):
    import random

    from esd_lora.latents import LatentBatch
    from esd_lora.recipe import ConceptSection

    pipe = load_pipeline(str(tiny_models["sd1"]))
    concept = ConceptSection(prompts=["a red shape"], preserve=["a blue shape", "a green shape"], preserve_on="own")
    esd = _esd_step(pipe, concept, batch=2)
    x = torch.randn(4, 4, 8, 8)
    xs, prompts = esd.batches(LatentBatch(x, ks=[1, 2], picks=[0, 0, 1, 0]), random.Random(0))
    assert torch.equal(xs[0], x[:2]) and torch.equal(xs[2], x[2:])
    assert prompts == [["a red shape"] * 2, [""] * 2, ["a green shape", "a blue shape"]]


def test_preserve_on_both_keeps_the_preserve_prompts_on_their_own_latents_and_on_the_concepts(tiny_models):
    import random

    from contextlib import nullcontext

    from esd_lora.latents import LatentBatch
    from esd_lora.recipe import ConceptSection

    pipe, unet = _trained_pipe(tiny_models)
    concept = ConceptSection(prompts=["a red circle"], preserve=["a blue circle", "a green circle"],
                             preserve_weight=2.0, preserve_on="both")
    esd = _esd_step(pipe, concept, batch=2)
    torch.manual_seed(2)
    latents = LatentBatch(torch.randn(4, 4, 8, 8), ks=[3, 7], picks=[0, 0, 1, 0])
    xs, prompts = esd.batches(latents, random.Random(0))
    assert torch.equal(xs[2], latents.x[2:]) and torch.equal(xs[3], latents.x[:2])
    assert prompts[2] == ["a green circle", "a blue circle"]
    assert len(prompts[3]) == 2 and set(prompts[3]) <= set(concept.preserve)
    t = torch.tensor([300, 700])
    loss = esd.loss(unet, lambda: adapters_off(unet), latents, t, random.Random(0), nullcontext)

    def eps(x, prompts, on):
        with torch.no_grad(), (nullcontext() if on else adapters_off(unet)):
            return unet(x, t, **esd.conditioner(prompts)).sample

    x = latents.x[:2]
    target = esd_target(eps(x, ["a red circle"] * 2, False), eps(x, [""] * 2, False), 1.0)
    expected = esd_loss(eps(x, ["a red circle"] * 2, True), target)
    for kept_x, kept in ((xs[2], prompts[2]), (xs[3], prompts[3])):
        expected = expected + 2.0 * esd_loss(eps(kept_x, kept, True), eps(kept_x, kept, False))
    assert torch.allclose(loss, expected, rtol=1e-4)


def test_an_attackers_conditioning_is_pulled_to_the_concepts_target_too(tiny_models):
    import random

    from contextlib import nullcontext

    from esd_lora.latents import LatentBatch
    from esd_lora.recipe import ConceptSection

    pipe, unet = _trained_pipe(tiny_models)
    esd = _esd_step(pipe, ConceptSection(prompts=["a red circle"], eta=1.0), batch=2)
    latents = LatentBatch(torch.randn(2, 4, 8, 8), ks=[3, 7], picks=[0, 0])
    t = torch.tensor([300, 700])
    attackers = [{"encoder_hidden_states": torch.randn(2, 32, 16)} for _ in range(2)]

    def loss(adversarial):
        return esd.loss(unet, lambda: adapters_off(unet), latents, t, random.Random(0), nullcontext, adversarial, 3.0)

    with torch.no_grad():
        plain = loss([])
        with adapters_off(unet):
            target = esd_target(unet(latents.x, t, **esd.conditioner(["a red circle"] * 2)).sample,
                                unet(latents.x, t, **esd.conditioner([""] * 2)).sample, 1.0)
        attacked = [esd_loss(unet(latents.x, t, **a).sample, target) for a in attackers]
        assert torch.allclose(loss(attackers), plain + 3.0 * sum(attacked), rtol=1e-4)


def test_an_attackers_target_can_keep_what_its_prompt_says_besides_the_concept(tiny_models):
    import random

    from contextlib import nullcontext

    from esd_lora.latents import LatentBatch
    from esd_lora.recipe import ConceptSection

    pipe, unet = _trained_pipe(tiny_models)
    esd = _esd_step(pipe, ConceptSection(prompts=["a red circle"], erase_from=["a circle"], eta=2.0), batch=2)
    latents = LatentBatch(torch.randn(2, 4, 8, 8), ks=[3, 7], picks=[0, 0])
    t = torch.tensor([300, 700])
    attacker, frozen = ({"encoder_hidden_states": torch.randn(2, 32, 16)} for _ in range(2))

    def loss(adversarial, frozen_adversarial=()):
        return esd.loss(unet, lambda: adapters_off(unet), latents, t, random.Random(0), nullcontext, adversarial, 3.0,
                        frozen_adversarial)

    def eps(cond):
        return unet(latents.x, t, **cond).sample

    with torch.no_grad():
        plain = loss([])
        with adapters_off(unet):
            concept, neutral = eps(esd.conditioner(["a red circle"] * 2)), eps(esd.conditioner(["a circle"] * 2))
            kept = eps(frozen) - 3.0 * (concept - neutral)  # what the teacher draws under it, less the concept
            said_the_concept = eps(esd.conditioner(["a red circle"] * 2)) - 3.0 * (concept - neutral)
        assert torch.allclose(loss([attacker], [frozen]), plain + 3.0 * esd_loss(eps(attacker), kept), rtol=1e-4)
        # an attacker whose prompt says the concept and nothing else gets the concept's own target
        assert torch.allclose(said_the_concept, esd_target(concept, neutral, 2.0), atol=1e-5)
        assert torch.allclose(loss([attacker], [esd.conditioner(["a red circle"] * 2)]), loss([attacker]), rtol=1e-5)


def test_an_attackers_eta_can_differ_from_the_concepts(tiny_models):
    import random

    from contextlib import nullcontext

    from esd_lora.latents import LatentBatch
    from esd_lora.recipe import ConceptSection

    pipe, unet = _trained_pipe(tiny_models)
    esd = _esd_step(pipe, ConceptSection(prompts=["a red circle"], erase_from=["a circle"], eta=2.0), batch=2)
    latents = LatentBatch(torch.randn(2, 4, 8, 8), ks=[3, 7], picks=[0, 0])
    t = torch.tensor([300, 700])
    attacker = {"encoder_hidden_states": torch.randn(2, 32, 16)}

    def loss(adversarial, eta=None):
        return esd.loss(unet, lambda: adapters_off(unet), latents, t, random.Random(0), nullcontext, adversarial, 3.0,
                        adversarial_eta=eta)

    with torch.no_grad():
        plain = loss([])
        with adapters_off(unet):
            neutral = unet(latents.x, t, **esd.conditioner(["a circle"] * 2)).sample
        under_attacker = unet(latents.x, t, **attacker).sample
        # eta 0: the attacker's prompt pulled to the neutral prompt's prediction and no further
        assert torch.allclose(loss([attacker], 0.0), plain + 3.0 * esd_loss(under_attacker, neutral), rtol=1e-4)
        assert torch.allclose(loss([attacker], 2.0), loss([attacker]), rtol=1e-6)
        assert not torch.allclose(loss([attacker], 0.0), loss([attacker]), rtol=1e-3)
