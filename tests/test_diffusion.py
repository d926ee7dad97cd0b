import math

import numpy as np
import pytest
import torch

from models import Diffusion
from models.diffusion import sampling_timesteps


def test_schedule_is_linear_float64():
    d = Diffusion()
    assert d.betas.dtype == np.float64
    assert d.betas[0] == pytest.approx(1e-4) and d.betas[-1] == pytest.approx(0.02)
    assert d.alphas_cumprod[-1] == pytest.approx(np.prod(1 - d.betas))


def test_sampling_timesteps():
    kept = sampling_timesteps(1000, 50)
    assert kept == [round(k * 999 / 49) for k in range(50)]
    assert kept[0] == 0 and kept[-1] == 999
    assert sampling_timesteps(1000, 1) == [0]
    assert sampling_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError, match="steps"):
        sampling_timesteps(1000, 0)


def test_ddim_recovers_x0_for_an_oracle_model():
    """With the true epsilon of a fixed x0, deterministic DDIM lands exactly on x0, for any step count."""
    d = Diffusion()
    x0 = torch.randn(2, 3, 4, 4)
    for steps in (1, 7, 50):
        kept = sampling_timesteps(1000, steps)
        t_last = torch.full((2,), kept[-1])
        noise = torch.randn_like(x0)
        z = d.q_sample(x0, t_last, noise)

        def oracle(x, t):
            ab = torch.from_numpy(d.alphas_cumprod)[t].float().view(-1, 1, 1, 1)
            return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

        out = d.ddim_sample(oracle, z, steps=steps)
        assert torch.allclose(out, x0, atol=2e-4), steps
    clipped = d.ddim_sample(lambda x, t: torch.full_like(x, 50.0), z, steps=7, clip_denoised=True)
    assert clipped.abs().max() <= 1 + 1e-6


def test_dpm_solver_recovers_x0_for_an_oracle_model():
    d = Diffusion()
    x0 = torch.randn(2, 3, 4, 4)

    def oracle(x, t):
        ab = torch.from_numpy(d.alphas_cumprod)[t].float().view(-1, 1, 1, 1)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    z = d.q_sample(x0, torch.full((2,), 999), torch.randn_like(x0))
    assert torch.allclose(d.dpm_solver_sample(oracle, z, steps=20), x0, atol=1e-4)


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
        d.training_losses(lambda x, t: x, torch.randn(1, 4, 2, 2), torch.tensor([3]))


def _v_of(d, x0, noise, t):
    a = torch.from_numpy(d.alphas_cumprod)[t].float().view(-1, 1, 1, 1)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def test_v_prediction_reads_back_eps_and_trains_on_v():
    d = Diffusion(prediction="v")
    x0, noise = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    t = torch.tensor([0, 10, 500, 999])
    x_t = d.q_sample(x0, t, noise)
    v = _v_of(d, x0, noise, t)
    assert torch.allclose(d.eps_from(v, x_t, t), noise, atol=1e-4)
    var = torch.randn_like(x0).tanh()
    losses = d.training_losses(lambda x, tt: torch.cat([v, var], 1), x0, t, noise=noise)
    assert losses["mse"].max() < 1e-10
    eps_losses = Diffusion().training_losses(lambda x, tt: torch.cat([noise, var], 1), x0, t, noise=noise)
    assert torch.allclose(losses["vb"], eps_losses["vb"], rtol=1e-3, atol=1e-5)
    wrong = d.training_losses(lambda x, tt: torch.cat([noise, var], 1), x0, t, noise=noise)["mse"]
    assert torch.allclose(wrong, ((noise - v) ** 2).mean(dim=(1, 2, 3)), rtol=1e-3)
    with pytest.raises(ValueError, match="prediction"):
        Diffusion(prediction="x0")


def test_v_prediction_samplers_match_eps_ones():
    """A v model and the eps model it implies give the same DDIM and DPM-Solver++ samples."""
    eps_d, v_d = Diffusion(), Diffusion(prediction="v")
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    eps_fn = lambda x, t: torch.sin(3 * x) + 0.1 * t.float().view(-1, 1, 1, 1) / 1000

    def v_fn(x, t):
        a = torch.from_numpy(eps_d.alphas_cumprod)[t].float().view(-1, 1, 1, 1)
        eps = eps_fn(x, t)
        return (eps - (1 - a).sqrt() * x) / a.sqrt()

    z = eps_d.q_sample(x0, torch.full((2,), 999), torch.randn_like(x0))
    assert torch.allclose(v_d.ddim_sample(v_fn, z, steps=10), eps_d.ddim_sample(eps_fn, z, steps=10), atol=1e-3)
    assert torch.allclose(v_d.dpm_solver_sample(v_fn, z, steps=10), eps_d.dpm_solver_sample(eps_fn, z, steps=10),
                          atol=1e-3)
