"""The Gaussian diffusion of X-MDPT (as in ADM/DiT): linear betas, epsilon prediction, learned-range
variance, the hybrid MSE + VLB loss, and the DDIM sampler stepping exactly between the kept timesteps.

What the model's first output channels predict travels with it: `prediction_of(model)` reads the model's (or
its guided denoiser's) `prediction`, and a denoiser that does not say is refused, never taken for eps. "v" (not
in the paper) trains them on v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho, 2022) instead of eps,
a = alpha_bar_t; everything else reads eps = sqrt(a) v + sqrt(1 - a) x_t back from it. Epsilon prediction
amplifies its error by 1 / sqrt(a), about 160x at t = 999, so a small pixel-space model needs far fewer steps
with v to draw coherent images.

Schedule arrays are float64; each coefficient is taken at t as float32 before use, as ADM does, from a table
kept on the device (so no step copies the schedule there).
"""
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from data.errors import InputError


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The standard normal CDF of x, by the tanh approximation ADM uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of x in [-1, 1], quantised to 256 bins, under a Gaussian (the decoder term at t=0)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x):
    """The mean of x over every dimension but the first: (N, ...) -> (N,)."""
    return x.mean(dim=list(range(1, x.ndim)))


def ddim_timesteps(num_timesteps, steps):
    """The original timesteps a `steps`-step DDIM sampler visits: round(k * (T-1)/(steps-1)), k = 0..steps-1."""
    if not 1 <= steps <= num_timesteps:
        raise InputError(f"sampling steps must be in [1, {num_timesteps}], got {steps}")
    stride = (num_timesteps - 1) / (steps - 1) if steps > 1 else 1
    kept, position = [], 0.0
    for _ in range(steps):
        kept.append(round(position))
        position += stride
    return kept


NUM_TIMESTEPS = 1000
PREDICTIONS = ("eps", "v")


def prediction_of(model):
    """What the first output channels of `model` (an XMDPT, its guided denoiser, or any function with a
    `prediction` attribute) predict: 'eps' or 'v'. A denoiser that does not say is a TypeError: a v-model
    sampled as eps would give plausible-looking wrong images."""
    prediction = getattr(model, "prediction", None)
    if prediction is None:
        raise TypeError(f"{model!r} does not say what it predicts: give it a `prediction` attribute, one of "
                        f"{PREDICTIONS} (XMDPT and its guided denoisers have one)")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    return prediction


def refuse_consistency_models(fn, sampler):
    """A TypeError when `fn` is a consistency model's denoiser: it maps noise to data in one evaluation, and a
    diffusion sampler's steps would misread it."""
    if getattr(fn, "consistency", False):
        raise TypeError(f"{sampler} samples diffusion models; this is a consistency model: sample it with "
                        "models.consistency.consistency_sample")


class Diffusion:
    """The 1000-step Gaussian diffusion with linear betas: its schedule (float64 arrays), the training losses
    and the samplers."""
    def __init__(self, num_timesteps=NUM_TIMESTEPS, beta_start=1e-4, beta_end=0.02):
        self.num_timesteps = num_timesteps
        scale = 1000 / num_timesteps
        betas = np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)
        self.betas = betas
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.alphas_cumprod = alphas_cumprod
        self.sqrt_alphas_cumprod = np.sqrt(alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod - 1)
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)
        self.log_betas = np.log(betas)
        self._tables = {}

    def _at(self, arr, t, x):
        """arr[t] as float32, shaped to broadcast over x."""
        key = (id(arr), t.device)
        if key not in self._tables:
            self._tables[key] = torch.from_numpy(arr).float().to(t.device)
        return self._tables[key][t].view(-1, *([1] * (x.ndim - 1)))

    def sample_timesteps(self, n, device=None, generator=None):
        """n timesteps drawn uniformly from [0, T), as a long tensor (n,)."""
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(a) x0 + sqrt(1 - a) noise, a = alpha_bar_t: the noisy latents at timesteps t (N,)."""
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def predict_x0(self, x_t, t, eps):
        """The clean latents that x_t and its noise eps imply: (x_t - sqrt(1 - a) eps) / sqrt(a)."""
        return self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def x0_from(self, pred, x_t, t, prediction):
        """The clean estimate that the model's prediction (eps or v, the first output channels) implies."""
        if prediction == "eps":
            return self.predict_x0(x_t, t, pred)
        a, s = self._at(self.sqrt_alphas_cumprod, t, x_t), self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        return a * x_t - s * pred

    def eps_from(self, pred, x_t, t, prediction):
        """eps from the model's prediction (the first output channels), eps or v."""
        if prediction == "eps":
            return pred
        a, s = self._at(self.sqrt_alphas_cumprod, t, x_t), self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        return a * pred + s * x_t

    def prediction_target(self, x0, noise, t, prediction):
        """What a model's first output channels should predict for x_t = q_sample(x0, t, noise): the noise (eps),
        or v = sqrt(a) noise - sqrt(1 - a) x0."""
        if prediction == "eps":
            return noise
        a, s = self._at(self.sqrt_alphas_cumprod, t, x0), self._at(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return a * noise - s * x0

    def q_posterior(self, x0, x_t, t):
        """The mean and clipped log variance of q(x_(t-1) | x_t, x0)."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_log_variance_clipped, t, x_t)

    def vb_terms_bpd(self, eps, var_values, x0, x_t, t):
        """The VLB term in bits per dimension for a model output (eps, variance interpolation in [-1, 1])."""
        true_mean, true_logvar = self.q_posterior(x0, x_t, t)
        min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
        max_log = self._at(self.log_betas, t, x_t)
        frac = (var_values + 1) / 2
        model_logvar = frac * max_log + (1 - frac) * min_log
        model_mean, _ = self.q_posterior(self.predict_x0(x_t, t, eps), x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x0, t, model_kwargs=None, noise=None):
        """Per-sample `mse` (of eps, or of v: `prediction_of(model)`), `vb` (VLB with the mean frozen, trains the
        variance) and `loss`."""
        prediction = prediction_of(model)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t, **(model_kwargs or {}))
        channels = x0.shape[1]
        if out.shape[1] != 2 * channels:
            raise ValueError(f"training_losses needs a learned-sigma model output with {2 * channels} channels, "
                             f"got {out.shape[1]}")
        pred, var_values = out.split(channels, dim=1)
        target = self.prediction_target(x0, noise, t, prediction)
        vb = self.vb_terms_bpd(self.eps_from(pred.detach(), x_t, t, prediction), var_values, x0, x_t, t)
        mse = mean_flat((target - pred) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def ddim_step(self, x, t, t_prev, pred, prediction, clip_denoised=False):
        """One deterministic DDIM step (eta = 0) from x at timesteps t to t_prev (both (N,)), given the model's
        prediction there (eps or v); a negative t_prev lands on alpha_bar = 1. clip_denoised clamps the x0
        estimate to [-1, 1], and the step follows the eps that the clamped x0 implies."""
        x0 = self.predict_x0(x, t, self.eps_from(pred, x, t, prediction))
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        eps = (self._at(self.sqrt_recip_alphas_cumprod, t, x) * x - x0) / \
            self._at(self.sqrt_recipm1_alphas_cumprod, t, x)
        alpha_bar_prev = torch.where((t_prev < 0).view(-1, *([1] * (x.ndim - 1))), 1.0,
                                     self._at(self.alphas_cumprod, t_prev.clamp(min=0), x))
        return x0 * alpha_bar_prev.sqrt() + (1 - alpha_bar_prev).sqrt() * eps

    @torch.no_grad()
    def ddim_sample(self, model_fn, z, steps=50, progress=False, clip_denoised=False):
        """Deterministic DDIM (eta = 0) from noise z over `steps` kept timesteps; the last step lands on
        alpha_bar = 1. model_fn(x, t) gets the original timesteps and returns the prediction (eps, or v as
        `prediction_of(model_fn)` says) in its first channels.
        clip_denoised clamps each x0 prediction to [-1, 1] (for pixel-space models; the released latent
        models sample without it)."""
        refuse_consistency_models(model_fn, "DDIM")
        kept = ddim_timesteps(self.num_timesteps, steps)
        prediction = prediction_of(model_fn)
        x = z
        for i in tqdm(range(steps - 1, -1, -1), disable=not progress, desc="DDIM"):
            t = torch.full((z.shape[0],), kept[i], dtype=torch.long, device=z.device)
            t_prev = torch.full_like(t, kept[i - 1] if i > 0 else -1)
            x = self.ddim_step(x, t, t_prev, model_fn(x, t)[:, :z.shape[1]].to(x.dtype), prediction, clip_denoised)
        return x

    @torch.no_grad()
    def dpm_solver_sample(self, model_fn, z, steps=20, progress=False, clip_denoised=False):
        """DPM-Solver++ (2nd order, multistep) through diffusers' scheduler on this schedule. clip_denoised clamps
        each x0 estimate to [-1, 1], as ddim_sample does (diffusers' dynamic thresholding with its largest
        value at 1 is exactly that clamp)."""
        from diffusers import DPMSolverMultistepScheduler
        refuse_consistency_models(model_fn, "DPM-Solver++")
        scheduler = DPMSolverMultistepScheduler(num_train_timesteps=self.num_timesteps, trained_betas=self.betas,
                                                prediction_type="epsilon", algorithm_type="dpmsolver++",
                                                solver_order=2, thresholding=clip_denoised, sample_max_value=1.0)
        scheduler.set_timesteps(steps, device=z.device)
        prediction = prediction_of(model_fn)
        x = z
        for t in tqdm(scheduler.timesteps, disable=not progress, desc="DPM-Solver++"):
            t_batch = t.expand(z.shape[0]).to(z.device)
            eps = self.eps_from(model_fn(x, t_batch)[:, :z.shape[1]].to(x.dtype), x, t_batch, prediction)
            x = scheduler.step(eps, t, x).prev_sample
        return x
