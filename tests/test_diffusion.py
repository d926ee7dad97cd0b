import math

import numpy as np
import pytest
import torch

from models import XMDPT, Diffusion
from models.diffusion import ddim_timesteps


def test_schedule_is_linear_float64():
    d = Diffusion()
    assert d.betas.dtype == np.float64
    assert d.betas[0] == pytest.approx(1e-4) and d.betas[-1] == pytest.approx(0.02)
    assert d.alphas_cumprod[-1] == pytest.approx(np.prod(1 - d.betas))


def test_ddim_timesteps():
    kept = ddim_timesteps(1000, 50)
    assert kept == [round(k * 999 / 49) for k in range(50)]
    assert kept[0] == 0 and kept[-1] == 999
    assert ddim_timesteps(1000, 1) == [0]
    assert ddim_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(1000, 0)


def test_ddim_recovers_x0_for_an_oracle_model():
    """With the true epsilon of a fixed x0, deterministic DDIM lands exactly on x0, for any step count."""
    d = Diffusion()
    x0 = torch.randn(2, 3, 4, 4)
    for steps in (1, 7, 50):
        kept = ddim_timesteps(1000, steps)
        t_last = torch.full((2,), kept[-1])
        noise = torch.randn_like(x0)
        z = d.q_sample(x0, t_last, noise)

        def oracle(x, t):
            ab = torch.from_numpy(d.alphas_cumprod)[t].float().view(-1, 1, 1, 1)
            return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

        out = d.ddim_sample(predicting("eps", oracle), z, steps=steps)
        assert torch.allclose(out, x0, atol=2e-4), steps
    clipped = d.ddim_sample(predicting("eps", lambda x, t: torch.full_like(x, 50.0)), z, steps=7, clip_denoised=True)
    assert clipped.abs().max() <= 1 + 1e-6


def test_dpm_solver_recovers_x0_for_an_oracle_model():
    d = Diffusion()
    x0 = torch.randn(2, 3, 4, 4)

    def oracle(x, t):
        ab = torch.from_numpy(d.alphas_cumprod)[t].float().view(-1, 1, 1, 1)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    z = d.q_sample(x0, torch.full((2,), 999), torch.randn_like(x0))
    assert torch.allclose(d.dpm_solver_sample(predicting("eps", oracle), z, steps=20), x0, atol=1e-4)


def test_dpm_solver_clip_denoised_clamps_every_x0_estimate():
    """An oracle of data at 1.5 and -1.5: every x0 estimate is then +-1.5, clamped +-1, so the solver's last
    step, which lands on its x0 estimates, ends at +-1 exactly; without the clamp, on the data."""
    d = Diffusion()
    x0 = torch.tensor([1.5, -1.5]).view(2, 1, 1, 1).expand(2, 3, 4, 4)

    def oracle(x, t):
        ab = torch.from_numpy(d.alphas_cumprod)[t].float().view(-1, 1, 1, 1)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    z = d.q_sample(x0, torch.full((2,), 999), torch.randn_like(x0))
    assert torch.allclose(d.dpm_solver_sample(predicting("eps", oracle), z, steps=10), x0, atol=1e-4)
    clipped = d.dpm_solver_sample(predicting("eps", oracle), z, steps=10, clip_denoised=True)
    torch.testing.assert_close(clipped, x0.sign(), rtol=0, atol=1e-5)


def test_vb_term_is_kl_and_decoder_nll_at_zero():
    d = Diffusion()
    x0 = torch.rand(2, 1, 2, 2) * 2 - 1
    x_t = torch.randn_like(x0)
    t = torch.tensor([0, 500])
    eps = torch.randn_like(x0)
    var = torch.zeros_like(x0)
    vb = d.vb_terms_bpd(eps, var, x0, x_t, t)
    mean, logvar = d.q_posterior(x0, x_t, t)
    x0_hat = d.predict_x0(x_t, t, eps)
    model_mean, _ = d.q_posterior(x0_hat, x_t, t)
    model_logvar = 0.5 * (torch.tensor(d.log_betas[500]) + torch.tensor(d.posterior_log_variance_clipped[500]))
    kl = 0.5 * (-1 + model_logvar - logvar[1] + torch.exp(logvar[1] - model_logvar)
                + (mean[1] - model_mean[1]) ** 2 * torch.exp(-model_logvar))
    assert vb[1].item() == pytest.approx(kl.mean().item() / math.log(2), rel=1e-5)
    assert vb[0] > 0


def test_training_losses_need_learned_sigma():
    d = Diffusion()
    with pytest.raises(ValueError, match="learned-sigma"):
        d.training_losses(predicting("eps", lambda x, t: x), torch.randn(1, 4, 2, 2), torch.tensor([3]))


def _v_of(d, x0, noise, t):
    a = torch.from_numpy(d.alphas_cumprod)[t].float().view(-1, 1, 1, 1)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def predicting(prediction, fn):
    """fn, marked as predicting eps or v in its first channels, as XMDPT and its guided denoiser are."""
    fn.prediction = prediction
    return fn


def test_v_prediction_reads_back_eps_and_trains_on_v():
    d = Diffusion()
    x0, noise = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    t = torch.tensor([0, 10, 500, 999])
    x_t = d.q_sample(x0, t, noise)
    v = _v_of(d, x0, noise, t)
    assert torch.allclose(d.eps_from(v, x_t, t, "v"), noise, atol=1e-4)
    var = torch.randn_like(x0).tanh()
    losses = d.training_losses(predicting("v", lambda x, tt: torch.cat([v, var], 1)), x0, t, noise=noise)
    assert losses["mse"].max() < 1e-10
    eps_losses = d.training_losses(predicting("eps", lambda x, tt: torch.cat([noise, var], 1)), x0, t, noise=noise)
    assert torch.allclose(losses["vb"], eps_losses["vb"], rtol=1e-3, atol=1e-5)
    wrong = d.training_losses(predicting("v", lambda x, tt: torch.cat([noise, var], 1)), x0, t, noise=noise)["mse"]
    assert torch.allclose(wrong, ((noise - v) ** 2).mean(dim=(1, 2, 3)), rtol=1e-3)
    with pytest.raises(ValueError, match="prediction"):
        d.training_losses(predicting("x0", lambda x, tt: torch.cat([v, var], 1)), x0, t, noise=noise)


def test_a_denoiser_that_does_not_say_what_it_predicts_is_refused():
    """A plain function has no `prediction`: every sampler and the loss refuse it rather than take it for eps
    (a v-model wrapped in a lambda would otherwise be sampled as eps, with no error)."""
    d = Diffusion()
    model = XMDPT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, pose_dim=16,
                  image_dim=24, dino_tokens=5, prediction="v").eval()
    cond = dict(pose=torch.randn(1, 5, 16), image=torch.randn(1, 5, 24), source=torch.randn(1, 4, 8, 8))
    fn = model.guided(**cond)
    wrapped = lambda x, t: fn(x, t)  # noqa: E731, the way a prediction type gets lost
    z = torch.randn(1, 4, 8, 8)
    for call in (lambda: d.ddim_sample(wrapped, z, steps=2), lambda: d.dpm_solver_sample(wrapped, z, steps=2),
                 lambda: d.training_losses(lambda x, t, **kw: model(x, t, **kw), z, torch.tensor([5]), cond)):
        with pytest.raises(TypeError, match="does not say what it predicts"):
            call()
    d.ddim_sample(fn, z, steps=2)  # the guided denoiser itself says it


def test_v_prediction_samplers_match_eps_ones():
    """A v model and the eps model it implies give the same DDIM and DPM-Solver++ samples (in float64: at
    t = 999 reading eps back from v divides by sqrt(alpha_bar) = 0.0064, which float32 rounding cannot bear)."""
    d = Diffusion()
    x0 = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    eps_fn = predicting("eps", lambda x, t: torch.sin(3 * x) + 0.1 * t.double().view(-1, 1, 1, 1) / 1000)

    def v_fn(x, t):
        a = torch.from_numpy(d.alphas_cumprod)[t].view(-1, 1, 1, 1)
        eps = eps_fn(x, t)
        return (eps - (1 - a).sqrt() * x) / a.sqrt()

    v_fn = predicting("v", v_fn)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z = d.q_sample(x0, torch.full((2,), 999), noise)
    # The toy denoiser drives the samples to hundreds: the tolerance is relative (diffusers' scheduler keeps its
    # schedule in float32, about 1e-5 of a value, over 40 draws of the noise).
    for sampler in (d.ddim_sample, d.dpm_solver_sample):
        torch.testing.assert_close(sampler(v_fn, z, steps=10), sampler(eps_fn, z, steps=10), rtol=1e-4, atol=1e-3)


def test_the_prediction_type_travels_with_the_model():
    """A v-model trains on v and samples as v without being told: Diffusion reads it from the model and from
    the guided denoiser the model makes; nothing else says it."""
    from models import XMDPT
    torch.manual_seed(0)
    model = XMDPT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, pose_dim=16,
                  image_dim=24, dino_tokens=5, prediction="v").eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    cond = dict(pose=torch.randn(2, 5, 16), image=torch.randn(2, 5, 24), source=torch.randn(2, 4, 8, 8))
    d = Diffusion()
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([100, 900])
    with torch.no_grad():
        out = model(d.q_sample(x0, t, noise), t, **cond)[:, :4]
        mse = d.training_losses(model, x0, t, cond, noise)["mse"]
    torch.testing.assert_close(mse, ((out - _v_of(d, x0, noise, t)) ** 2).mean(dim=(1, 2, 3)))
    fn = model.guided(**cond)
    assert fn.prediction == "v"
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    as_eps = d.ddim_sample(predicting("eps", lambda x, tt: fn(x, tt)), z, steps=4)
    as_v = d.ddim_sample(predicting("v", lambda x, tt: fn(x, tt)), z, steps=4)
    assert torch.equal(d.ddim_sample(fn, z, steps=4), as_v) and (as_v - as_eps).abs().max() > 0.1


# ---- a non-oracle model with a closed-form answer ---------------------------------------------------------
# Data: per sample, x0 = mu + (mean part of std s_mean) + (deviations of std s_dev), i.e. a Gaussian whose
# covariance couples all values of a sample through their mean. Its exact denoiser is linear in each part:
# E[part of x0 | x_t] = prior + k(v) (part of x_t - sqrt(a) prior), k(v) = sqrt(a) v / (a v + 1 - a), v the
# part's variance. Its x0 prediction changes along every trajectory, so no solver is exact for it (an oracle
# for one x0 makes every data-prediction solver exact), yet the probability-flow ODE is solved in closed
# form: each standardised part (x_t - sqrt(a) prior) / sqrt(a v + 1 - a) stays constant along it.

MU, S_MEAN, S_DEV = 0.3, 0.9, 0.6


def split(x):
    """(per-sample mean broadcast over the sample's values, the deviations from it)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x)
    return mean, x - mean


def gaussian_data_model(d, s_mean=S_MEAN, s_dev=S_DEV):
    alphas = torch.from_numpy(d.alphas_cumprod)

    def eps(x, t):
        a = alphas[t].view(-1, 1, 1, 1).to(x.dtype)
        k = lambda v: a.sqrt() * v / (a * v + 1 - a)
        mean, dev = split(x)
        x0 = MU + k(s_mean ** 2) * (mean - a.sqrt() * MU) + k(s_dev ** 2) * dev
        return (x - a.sqrt() * x0) / (1 - a).sqrt()
    return predicting("eps", eps)


def ode_solution(d, z, s_mean=S_MEAN, s_dev=S_DEV):
    a = float(d.alphas_cumprod[-1])
    mean, dev = split(z)
    return (MU + s_mean * (mean - math.sqrt(a) * MU) / math.sqrt(a * s_mean ** 2 + 1 - a)
            + s_dev * dev / math.sqrt(a * s_dev ** 2 + 1 - a))


@pytest.fixture
def gaussian_case():
    d = Diffusion()
    z = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return d, z, gaussian_data_model(d), ode_solution(d, z)


def test_ddim_is_first_order_on_a_non_oracle_model(gaussian_case):
    d, z, model, exact = gaussian_case
    errors = [(d.ddim_sample(model, z, steps=n) - exact).abs().max().item() for n in (10, 20, 40, 80)]
    for coarse, fine in zip(errors, errors[1:]):
        assert 1.8 < coarse / fine < 2.2, errors  # halving the step halves the error
    assert errors[-1] < 0.06


def test_dpm_solver_is_second_order_and_beats_ddim(gaussian_case):
    """Measured: 0.276 at 10 steps, 0.050 at 20, 0.0047 at 32, 0.0024 at 64; DDIM gives 0.231 at 20. Beyond
    ~40 steps the error stays at 1e-3 to 3e-3: diffusers keeps the schedule in float32, and at t = 999 the data
    prediction divides by sqrt(alpha_bar) = 0.0064. (A schedule off by 1% gives 0.0060 at 32, 0.0064 at 64.)"""
    d, z, model, exact = gaussian_case
    error = lambda n: (d.dpm_solver_sample(model, z, steps=n) - exact).abs().max().item()
    e10, e20, e32, e64 = error(10), error(20), error(32), error(64)
    assert e10 / e20 > 4  # at least second order
    assert e20 < 0.25 * (d.ddim_sample(model, z, steps=20) - exact).abs().max().item()
    assert e32 < 0.0055 and e64 < 0.004


def reference_ddim(d, eps_fn, z, steps, clip):
    """DDIM (eta 0) written out from its definition, for comparison with Diffusion.ddim_sample."""
    ts = [round(k * (d.num_timesteps - 1) / (steps - 1)) for k in range(steps)]
    x = z
    for i in reversed(range(steps)):
        a = float(d.alphas_cumprod[ts[i]])
        eps = eps_fn(x, torch.full((len(x),), ts[i]))
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        a_prev = float(d.alphas_cumprod[ts[i - 1]]) if i > 0 else 1.0
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


def test_ddim_clip_denoised_on_a_non_oracle_model():
    """Wide data makes the x0 predictions leave [-1, 1]: clipping must bound every sample, follow
    DDIM's definition with the clipped x0 (and the eps it implies), and converge as the steps grow."""
    d = Diffusion()
    z = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = gaussian_data_model(d, s_mean=1.2, s_dev=1.5)
    plain = d.ddim_sample(model, z, steps=10)
    clipped = d.ddim_sample(model, z, steps=10, clip_denoised=True)
    assert plain.abs().max() > 1.5 and clipped.abs().max() <= 1
    torch.testing.assert_close(clipped, reference_ddim(d, model, z, 10, clip=True), rtol=1e-6, atol=1e-6)
    fine = d.ddim_sample(model, z, steps=999, clip_denoised=True)
    errors = [(d.ddim_sample(model, z, steps=n, clip_denoised=True) - fine).abs().mean().item() for n in (10, 40)]
    assert errors[1] < 0.5 * errors[0], errors


def test_training_losses_at_every_timestep_match_the_released_code(lowt):
    """t = 0 (the discretised decoder NLL), 1, 3, 20, 150, 600, 999, plain and masked (fixture
    official_lowt_init.pt); measured relative error 1.8e-7 at most."""
    model, x, cond, out = lowt
    assert x["t"].tolist() == [0, 0, 1, 3, 20, 150, 600, 999]
    for masked in (False, True):
        kwargs = dict(cond, drop_cond=torch.zeros(8, dtype=torch.bool), mask=masked,
                      mask_noise=x["mask_noise"] if masked else None)
        with torch.no_grad():
            losses = Diffusion().training_losses(model, x["x"], x["t"], kwargs, noise=x["noise"])
        expected = out["loss_masked" if masked else "loss_plain"]
        for key in ("mse", "vb", "loss"):
            assert ((losses[key] - expected[key]).abs() / expected[key].abs()).max() < 1e-4, (masked, key)
