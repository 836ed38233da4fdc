import random
from contextlib import nullcontext

import torch
from diffusers import DDIMScheduler

from esd_lora.latents import GuidedRuns, PartialRuns, RefreshedTrajectories
from esd_lora.models import Conditioner, load_pipeline


def _runs(path, own=()):
    pipe = load_pipeline(str(path))
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe.unet, GuidedRuns(Conditioner(pipe, "cpu", torch.float32), scheduler, ["a red shape", "a crimson shape"],
                                 list(own), 2, 5, 3.0, (4, 8, 8), torch.float32, torch.device("cpu"))


def test_preserve_prompts_on_their_own_latents_are_sampled_after_the_concepts(tiny_models):
    _, runs = _runs(tiny_models["sd1"], own=["a blue shape"])
    picks = runs.pick(random.Random(0))
    assert len(picks) == 4 and runs.images == 4
    assert runs.prompts_of(picks)[2:] == ["a blue shape"] * 2
    assert set(runs.prompts_of(picks)[:2]) <= {"a red shape", "a crimson shape"}


def test_partial_runs_end_at_the_drawn_index(tiny_models):
    unet, runs = _runs(tiny_models["sd1"])
    gen, rng = torch.Generator().manual_seed(3), random.Random(3)
    batch = PartialRuns(runs).draw(0, gen, rng, lambda: nullcontext(unet))
    gen, rng = torch.Generator().manual_seed(3), random.Random(3)
    picks = runs.pick(rng)
    k = int(torch.randint(0, 5, (1,), generator=gen))
    assert batch.ks == [k, k] and batch.picks == picks
    assert torch.equal(batch.x, runs.run(unet, picks, k, gen)[-1])


def test_refreshed_trajectories_are_reused_between_refreshes_and_resume_from_their_state(tiny_models):
    unet, runs = _runs(tiny_models["sd1"], own=["a blue shape"])
    source = RefreshedTrajectories(runs, every=3)
    sampling = lambda: nullcontext(unet)  # noqa: E731

    def draw(step):
        return source.draw(step, torch.Generator().manual_seed(step), random.Random(step), sampling)

    first = draw(0)
    trajectory = source.state()["trajectory"]
    assert trajectory.shape == (5, 4, 4, 8, 8)  # 5 indices, 2 concept and 2 preserve images
    for step in (0, 1, 2, 3):
        batch = first if step == 0 else draw(step)
        if step == 3:  # refreshed
            assert source.state()["trajectory"] is not trajectory
            trajectory = source.state()["trajectory"]
        assert batch.picks == source.state()["picks"]
        for i, k in enumerate(batch.ks * 2):  # one latent of each image, the preserve images at the concept's k
            assert torch.equal(batch.x[i], trajectory[k, i])
    resumed = RefreshedTrajectories(runs, every=3)
    resumed.load_state(source.state())
    again = resumed.draw(4, torch.Generator().manual_seed(4), random.Random(4), sampling)
    expected = source.draw(4, torch.Generator().manual_seed(4), random.Random(4), sampling)
    assert again.ks == expected.ks and torch.equal(again.x, expected.x)
