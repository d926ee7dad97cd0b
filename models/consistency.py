"""Consistency distillation (Song et al. 2023, "Consistency Models"; Luo et al. 2023, "Latent Consistency
Models"): a student X-MDPT that maps any point of its teacher's guided probability-flow ODE to the ODE's end in
one network evaluation, so that it samples in 1 to 8 steps instead of the teacher's 50 guided ones (100
evaluations).

- The teacher's ODE runs on LCM's 50 timesteps, t = 20 i - 1 (i = 1..50), a skip of k = 20 (`teacher_timesteps`).
- The guidance is folded in: a consistency target is one teacher DDIM step from t to t - k on the released
  power-cosine guidance (models/xmdpt.py `GUIDANCE` by default), the student's condition is never dropped, and
  it samples with one conditional evaluation a step.
- The student's consistency function is f(x, t) = c_skip(t) x + c_out(t) x0(x, t), x0 the clean estimate its
  eps or v output implies, with LCM's boundary scalings (sigma_data 0.5, t scaled by 10): c_skip(0) = 1 and
  c_out(0) = 0, so f is the identity at t = 0.
- The target network (`target_student`) is the run's EMA of the student (train.ema, 0.95 as in LCM), which is
  also what training saves and exports.
- Sampling is diffusers' LCMScheduler on our schedule: it fits it (our betas, eps or v, the teacher's
  timesteps), with our choice of timesteps (`lcm_timesteps`: 999, 679, 339, 19 for 4 steps).

A student says what it is with its weights: `XMDPTConfig.consistency`.
"""
import torch
from diffusers import LCMScheduler
from tqdm.auto import tqdm

from data.errors import InputError

from .diffusion import mean_flat, prediction_of
from .objective import Objective
from .xmdpt import GUIDANCE

TEACHER_STEPS = 50  # the timesteps of the teacher's ODE: k i - 1, k = T / TEACHER_STEPS
LOSSES = ("huber", "l2")
WEIGHTINGS = ("uniform", "ict")


def lcm_scheduler(diffusion, prediction, clip_denoised=False):
    """diffusers' LCMScheduler on `diffusion`'s schedule, for a model that predicts `prediction` (eps or v);
    clip_denoised clamps each x0 estimate to [-1, 1] (pixel-space models)."""
    return LCMScheduler(num_train_timesteps=diffusion.num_timesteps, trained_betas=diffusion.betas,
                        original_inference_steps=TEACHER_STEPS, clip_sample=clip_denoised,
                        prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction])


def teacher_timesteps(num_timesteps, device=None):
    """The timesteps of the teacher's ODE, ascending: k i - 1 for i = 1..TEACHER_STEPS."""
    k = num_timesteps // TEACHER_STEPS
    return torch.arange(1, TEACHER_STEPS + 1, device=device) * k - 1


def lcm_timesteps(num_timesteps, steps):
    """The timesteps a `steps`-step consistency sampler visits: evenly spaced over the teacher's, its top (999) and
    its bottom (19) included, descending. LCMScheduler's own spacing (999, 759, 499, 259 for 4) stops where a quarter
    of the noise is still left to remove in one evaluation; ending at the bottom leaves the last step a light
    refinement, which scores higher on the demo set, for the teacher's own ODE as for the student (docs/demo.md)."""
    if not 1 <= steps <= TEACHER_STEPS:
        raise InputError(f"sampling steps of a consistency model must be in [1, {TEACHER_STEPS}], got {steps}")
    return teacher_timesteps(num_timesteps)[torch.linspace(TEACHER_STEPS - 1, 0, steps).round().long()].tolist()


def ict_weights(alphas_cumprod, num_timesteps):
    """iCT's weighting of a consistency pair t -> t - k (Song & Dhariwal 2023, "Improved Techniques for Training
    Consistency Models"): 1 / (sigma(t) - sigma(t - k)), sigma = sqrt((1 - alpha_bar) / alpha_bar) the noise level
    of the equivalent variance-exploding process (0 for the clean data below the teacher's first timestep), on
    each of the teacher's timesteps, ascending, scaled to average 1 over them. The pairs near the data, whose
    targets are exact and whose errors are small, weigh the most."""
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    sigma = ((1 - ab) / ab).sqrt()[teacher_timesteps(num_timesteps)]
    weights = 1 / (sigma - torch.cat([sigma.new_zeros(1), sigma[:-1]]))
    return (weights / weights.mean()).float()


class ConsistencyFunction:
    """f(net, x, t, cond) = c_skip(t) x + c_out(t) x0, x0 the clean estimate of the network's conditional output
    (eps or v, `prediction`), with LCM's boundary scalings (`scalings`): what a consistency model's sample is at
    timestep t. clip_denoised clamps x0 to [-1, 1], as the sampler clamps it; `straight_through` lets the gradient
    pass the clamp as if it were not there (a student learning from a loss on its samples)."""

    def __init__(self, diffusion, prediction, clip_denoised=False, straight_through=False):
        self.diffusion, self.clip_denoised, self.straight_through = diffusion, clip_denoised, straight_through
        self.scalings = lcm_scheduler(diffusion, prediction).get_scalings_for_boundary_condition_discrete

    def __call__(self, net, x, t, cond):
        n, channels = x.shape[:2]
        out = net(x, t, **cond, drop_cond=torch.zeros(n, dtype=torch.bool, device=x.device))[:, :channels]
        x0 = self.diffusion.x0_from(out.to(x.dtype), x, t, prediction_of(net))
        if self.clip_denoised:
            clamped = x0.clamp(-1, 1)
            x0 = x0 + (clamped - x0).detach() if self.straight_through else clamped
        c_skip, c_out = (c.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) for c in self.scalings(t.double()))
        return c_skip * x + c_out * x0


def pseudo_huber(a, b, c):
    """sqrt((a - b)^2 + c^2) - c, elementwise, averaged per sample: L2 for differences well under c, L1 above."""
    return mean_flat(((a - b) ** 2 + c ** 2).sqrt() - c)


class ConsistencyDistillation(Objective):
    """The objective of a consistency distillation run: objective(x0, cond) -> scalar terms (`total`, the
    distance to the consistency targets, and `mse`, the same as a mean squared error; both weighted alike).

    student: the XMDPT trained (the run's model); target_student: its EMA, which the loop updates; teacher: the
    frozen XMDPT distilled. loss: 'huber' (pseudo-Huber with `huber_c`, robust to the large early differences) or
    'l2'. weighting: 'uniform' (LCM: every pair of teacher timesteps alike) or 'ict' (`ict_weights`).
    clip_denoised: every x0 estimate is clamped to [-1, 1], in the teacher's DDIM steps as in the consistency
    function, as the samplers clamp them (pixel-space models).
    """

    def __init__(self, student, target_student, teacher, diffusion, cfg_scale=GUIDANCE["cfg_scale"],
                 scale_pow=GUIDANCE["scale_pow"], loss="huber", huber_c=1e-3, weighting="uniform",
                 clip_denoised=False):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.student, self.target_student, self.diffusion = student, target_student, diffusion
        self.teacher = teacher.eval().requires_grad_(False)
        self.cfg_scale, self.scale_pow, self.loss, self.huber_c = cfg_scale, scale_pow, loss, huber_c
        self.clip_denoised = clip_denoised
        self.pair_weights = (ict_weights(diffusion.alphas_cumprod, diffusion.num_timesteps) if weighting == "ict"
                             else torch.ones(TEACHER_STEPS))
        self.consistency_function = ConsistencyFunction(diffusion, prediction_of(student), clip_denoised)
        self.terms = ("total", "mse") if loss == "l2" else ("total", "huber", "mse")

    def forward(self, x0, cond):
        """x0 (N, C, H, W) target latents; cond: the condition (`pose`, `image` tokens, `source` latent)."""
        timesteps = teacher_timesteps(self.diffusion.num_timesteps, x0.device)
        i = torch.randint(0, TEACHER_STEPS, (x0.shape[0],), device=x0.device)
        t, weight = timesteps[i], self.pair_weights.to(x0.device)[i]
        t_prev = t - (timesteps[0] + 1)  # -1 below the teacher's first timestep: the step lands on the clean data
        x_t = self.diffusion.q_sample(x0, t, torch.randn(x0.shape, device=x0.device, dtype=x0.dtype))
        with torch.no_grad():
            guided = self.teacher.guided(**cond, cfg_scale=self.cfg_scale, scale_pow=self.scale_pow)
            pred = guided(x_t, t)[:, :x0.shape[1]].to(x0.dtype)
            x_prev = self.diffusion.ddim_step(x_t, t, t_prev, pred, prediction_of(guided), self.clip_denoised)
            f_target = self.consistency_function(self.target_student, x_prev, t_prev.clamp(min=0), cond)  # f(x, 0) = x
        f_student = self.consistency_function(self.student, x_t, t, cond)
        mse = (weight * mean_flat((f_student - f_target) ** 2)).mean()
        if self.loss == "l2":
            return {"total": mse, "mse": mse}
        huber = (weight * pseudo_huber(f_student, f_target, self.huber_c)).mean()
        return {"total": huber, "huber": huber, "mse": mse}


@torch.no_grad()
def consistency_sample(diffusion, model_fn, z, steps=4, generators=None, clip_denoised=False, progress=False):
    """Multistep consistency sampling from noise z: at each of `steps` of the teacher's timesteps (999, 679, 339, 19
    for 4: `lcm_timesteps`), the consistency function's clean estimate, then noise back to the next timestep,
    drawn by `generators` (one per sample, so a sample does not depend on its batch; None: torch's global
    generator).
    model_fn(x, t) is a consistency model's conditional denoiser (XMDPT.conditioned)."""
    if not getattr(model_fn, "consistency", False):
        raise TypeError("consistency_sample samples consistency models; this is a diffusion model: sample it with "
                        "Diffusion.ddim_sample or dpm_solver_sample")
    lcm = lcm_scheduler(diffusion, prediction_of(model_fn), clip_denoised)
    lcm.set_timesteps(timesteps=lcm_timesteps(diffusion.num_timesteps, steps))
    x = z
    for t in tqdm(lcm.timesteps.tolist(), disable=not progress, desc="consistency"):
        pred = model_fn(x, torch.full((z.shape[0],), t, device=z.device))[:, :z.shape[1]].to(x.dtype)
        x, denoised = lcm.step(pred, t, x, generator=generators, return_dict=False)
    return denoised
