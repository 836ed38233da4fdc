import torch
from diffusers import DDIMScheduler

from esd_lora.sampler import ddim_timesteps, loss_timestep, sample_trajectory

SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                set_alpha_to_one=False, steps_offset=1)


def test_loss_timestep_band_holds_the_ddim_timestep_reached_after_k_steps():
    scheduler = DDIMScheduler(**SCHEDULE)
    taus = ddim_timesteps(scheduler, 50)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for k in range(50):
        t = loss_timestep([k] * 200, 50, gen)
        assert t.min() >= taus[k] - 1 and t.max() < taus[k] + 19
        seen |= set(t.tolist())
    assert min(seen) == 0 and max(seen) == 999  # every noise level is covered


class Recorder(torch.nn.Module):
    """A stand-in UNet that predicts zero noise and records its calls."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, encoder_hidden_states):
        self.calls.append((x.shape[0], t.tolist(), encoder_hidden_states[:, 0, 0].tolist()))
        return type("Out", (), {"sample": torch.zeros_like(x)})()


def test_loss_timestep_draws_each_sample_in_its_own_band():
    gen = torch.Generator().manual_seed(0)
    t = loss_timestep([0, 24, 12], 25, gen)
    assert 960 <= t[0] < 1000 and 0 <= t[1] < 40 and 480 <= t[2] < 520


def test_sample_trajectory_runs_k_guided_steps_with_the_pair_in_one_batch():
    scheduler = DDIMScheduler(**SCHEDULE)
    unet = Recorder()
    cond = {"encoder_hidden_states": torch.ones(2, 3, 4)}
    uncond = {"encoder_hidden_states": torch.zeros(2, 3, 4)}
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    x0 = sample_trajectory(unet, scheduler, cond, uncond, 0, 50, 3.0, gen, (2, 4, 8, 8), torch.float32, "cpu")
    assert x0.shape == (1, 2, 4, 8, 8) and torch.equal(x0[0], noise) and unet.calls == []
    run = sample_trajectory(unet, scheduler, cond, uncond, 3, 50, 3.0, torch.Generator().manual_seed(0),
                            (2, 4, 8, 8), torch.float32, "cpu")
    assert run.shape == (4, 2, 4, 8, 8) and torch.equal(run[0], noise)
    x = run[-1]
    assert len(unet.calls) == 3
    assert all(n == 4 and e == [1.0, 1.0, 0.0, 0.0] for n, _, e in unet.calls)
    assert [c[1][0] for c in unet.calls] == [981, 961, 941]
    # with a zero-noise prediction each DDIM step rescales x by sqrt(alpha_prev / alpha)
    a = scheduler.alphas_cumprod
    assert torch.allclose(x, noise * (a[921] / a[981]).sqrt(), atol=1e-5)


def test_a_full_trajectory_holds_the_partial_runs_of_every_index():
    scheduler = DDIMScheduler(**SCHEDULE)
    unet = torch.nn.Module()
    weight = torch.linspace(-1, 1, 4).view(1, 4, 1, 1)
    unet.forward = lambda x, t, encoder_hidden_states: type(
        "Out", (), {"sample": x * weight * encoder_hidden_states[:, 0, 0].view(-1, 1, 1, 1) + 0.1})()
    cond = {"encoder_hidden_states": torch.ones(1, 3, 4)}
    uncond = {"encoder_hidden_states": torch.zeros(1, 3, 4)}
    full = sample_trajectory(unet, scheduler, cond, uncond, 9, 10, 3.0, torch.Generator().manual_seed(1),
                             (1, 4, 8, 8), torch.float32, "cpu")
    for k in (0, 4, 9):
        partial = sample_trajectory(unet, scheduler, cond, uncond, k, 10, 3.0, torch.Generator().manual_seed(1),
                                    (1, 4, 8, 8), torch.float32, "cpu")
        assert torch.equal(full[k], partial[-1])


def test_a_trajectory_through_a_real_v_prediction_model_is_the_pipelines_own_sampling(tiny_models):
    from esd_lora.models import Conditioner, load_pipeline

    pipe = load_pipeline(str(tiny_models["sd2"]))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    conditioner = Conditioner(pipe, "cpu", torch.float32)
    shape = (2, 4, 8, 8)
    ours = sample_trajectory(pipe.unet, pipe.scheduler, conditioner(["a red shape"] * 2), conditioner([""] * 2), 6,
                             6, 3.0, torch.Generator().manual_seed(5), shape, torch.float32, "cpu")
    theirs = pipe(["a red shape"] * 2, num_inference_steps=6, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert ours.shape == (7, *shape)
    assert torch.allclose(ours[-1], theirs, atol=1e-5)
