"""Distribution matching distillation (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image
Synthesis", DMD2): a few-step student X-MDPT whose samples are pushed towards the teacher's output distribution,
not only along the teacher's ODE, so that it can be as sharp as the teacher in 4 steps.

- The student is a consistency model (`XMDPTConfig.consistency`), sampled by the consistency sampler
  (models/consistency.py) at `lcm_timesteps(steps)`; its sample at each of those timesteps is its consistency
  function's clean estimate, clamped to [-1, 1] as the sampler clamps it (the gradient passes the clamp).
- Backward simulation: the sample a step trains on is the student's at one of its sampling timesteps, drawn per
  batch, after the student's own sampler has run from pure noise down to that timestep without gradient; so a
  multistep student learns from its own intermediate samples, as it meets them when sampling.
- The distribution matching gradient: the sample x0, noised to x_t at t drawn from [0.02 T, 0.98 T), gets a clean
  estimate from the real score (the frozen teacher with its power-cosine guidance) and from the fake score (a copy
  of the teacher trained online to denoise the student's samples). grad = (fake - real) / mean|x0 - real|, the
  mean over each sample's values, reaches x0 through the loss 0.5 mean((x0 - stopgrad(x0 - grad))^2), whose
  gradient in x0 is grad divided by the number of values in the batch.
- A GAN: a head on the fake score's tokens (after its blocks) tells noisy real images (the batch's targets) from
  noisy student samples at the same timesteps. It minimises softplus(-D(real)) + softplus(D(fake)); the student
  minimises softplus(-D(fake)), with the fake score and the head held fixed, so it is pushed towards real.
- Two time scales: the fake score and the head take an optimizer step of their own (`update`) at every training
  step, the student at every `ratio`-th one only (the first included): the fake score keeps up with the student.

The fake score, the head, their optimizer and the count of their updates travel with the run's checkpoints
(`run_state`), so a resumed run is the uninterrupted one.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .consistency import ConsistencyFunction, lcm_timesteps
from .diffusion import mean_flat, prediction_of
from .objective import Objective
from .xmdpt import GUIDANCE

DM_RANGE = (0.02, 0.98)  # the share of the timesteps the distribution matching gradient is taken over (DMD2's)


def distribution_matching_loss(x0, real, fake):
    """The loss whose gradient in the student's samples x0 (N, ...) is (fake - real) / mean|x0 - real| (the mean
    over each sample's values), divided by the number of values in the batch: DMD's gradient, the difference of the
    fake and the real score's clean estimates with its normaliser, through the stop-gradient trick."""
    with torch.no_grad():
        normaliser = (x0 - real).abs().mean(dim=list(range(1, x0.ndim)), keepdim=True)
        grad = torch.nan_to_num((fake - real) / normaliser)
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


def generator_gan_loss(logits):
    """The student's side of the GAN: softplus(-D(fake)), lower the more real the head finds its samples."""
    return F.softplus(-logits).mean()


def head_gan_loss(real_logits, fake_logits):
    """The head's side: softplus(-D(real)) + softplus(D(fake)), lower the better it tells them apart."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


class DiscriminatorHead(nn.Module):
    """Per-token logits (N, L) from the fake score's tokens (N, L, D): LayerNorm, Linear, SiLU, Linear."""

    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))

    def forward(self, tokens):
        return self.net(tokens).squeeze(-1)


class DMD2(Objective):
    """The objective of a DMD2 run: objective(x0, cond) -> scalar terms: `dm` and `gan` (the student's, at its
    steps), `fake` (the fake score's denoising loss) and `head` (the head's GAN loss); `total` sums what each
    network learns from.

    student: the XMDPT trained (the run's model, a consistency model); teacher: the frozen XMDPT distilled;
    fake_score: a trainable copy of the teacher. steps: the student's sampling steps; ratio: the steps per student
    update; lr, grad_clip: the fake score's and the head's AdamW; gan_weight: the student's GAN loss against
    `dm`; head_weight: the head's loss against `fake`; clip_denoised: the student's estimates are clamped to
    [-1, 1] as the sampler clamps them (pixel models).
    """

    alternating = True

    def __init__(self, student, teacher, fake_score, diffusion, steps=4, ratio=5, cfg_scale=GUIDANCE["cfg_scale"],
                 scale_pow=GUIDANCE["scale_pow"], lr=1e-4, grad_clip=1.0, gan_weight=3e-3, head_weight=1e-2,
                 clip_denoised=False):
        super().__init__()
        self.student, self.fake_score, self.diffusion = student, fake_score, diffusion
        self.teacher = teacher.eval().requires_grad_(False)
        self.head = DiscriminatorHead(student.config.hidden_size).to(next(fake_score.parameters()).device)
        self.ratio, self.grad_clip, self.gan_weight, self.head_weight = ratio, grad_clip, gan_weight, head_weight
        self.cfg_scale, self.scale_pow = cfg_scale, scale_pow
        self.timesteps = lcm_timesteps(diffusion.num_timesteps, steps)
        self.estimate = ConsistencyFunction(diffusion, prediction_of(student), clip_denoised, straight_through=True)
        self.optimizer = torch.optim.AdamW([*fake_score.parameters(), *self.head.parameters()], lr=lr,
                                           weight_decay=0.0)
        self.updates = 0  # optimizer steps of the fake score and the head so far
        self.terms = ("total", "dm", "gan", "fake", "head")

    def student_step(self):
        """Whether the student learns at this step: every `ratio`-th, counted in the fake score's updates."""
        return self.updates % self.ratio == 0

    def simulate(self, cond, shape, device):
        """Backward simulation: the student's sample at one of its sampling timesteps, drawn at random, its own
        sampler run from pure noise down to there without gradient. -> (the sample, its timestep)."""
        k = int(torch.randint(len(self.timesteps), ()))
        x = torch.randn(shape, device=device)
        with torch.no_grad():
            for t, t_next in zip(self.timesteps[:k], self.timesteps[1:k + 1]):
                x0 = self.estimate(self.student, x, torch.full(shape[:1], t, device=device), cond)
                x = self.diffusion.q_sample(x0, torch.full(shape[:1], t_next, device=device), torch.randn_like(x))
        t = self.timesteps[k]
        return self.estimate(self.student, x, torch.full(shape[:1], t, device=device), cond), t

    def clean_estimates(self, x_t, t, cond):
        """(the real score's, the fake score's) clean estimates at x_t: the guided teacher, the conditional fake."""
        channels = x_t.shape[1]
        real = self.teacher.guided(**cond, cfg_scale=self.cfg_scale, scale_pow=self.scale_pow)
        fake = self.fake_score.conditioned(**cond)
        return tuple(self.diffusion.x0_from(fn(x_t, t)[:, :channels].to(x_t.dtype), x_t, t, prediction_of(fn))
                     for fn in (real, fake))

    def fake_tokens(self, x_t, t, cond):
        """The fake score's conditional pass at x_t up to its head: its tokens after the blocks (what the
        discriminator head reads) and c."""
        return self.fake_score.trunk(x_t, t, self.fake_score.condition(**cond))

    def forward(self, x0, cond):
        """x0 (N, C, H, W) the batch's real latents (the GAN's real side); cond: the condition (`pose`, `image`
        tokens, `source` latent)."""
        n, device, T = x0.shape[0], x0.device, self.diffusion.num_timesteps
        student_step = self.student_step()
        with torch.set_grad_enabled(student_step):
            sample, _ = self.simulate(cond, x0.shape, device)
        terms, total = {}, 0.0
        if student_step:
            low, high = (int(f * T) for f in DM_RANGE)
            t = torch.randint(low, high, (n,), device=device)
            x_t = self.diffusion.q_sample(sample, t, torch.randn_like(sample))
            with torch.no_grad():
                real, fake = self.clean_estimates(x_t.detach(), t, cond)
            terms["dm"] = distribution_matching_loss(sample, real, fake)
            with frozen(self.fake_score, self.head):
                t = torch.randint(0, T, (n,), device=device)
                tokens, _ = self.fake_tokens(self.diffusion.q_sample(sample, t, torch.randn_like(sample)), t, cond)
                terms["gan"] = generator_gan_loss(self.head(tokens))
            total = terms["dm"] + self.gan_weight * terms["gan"]
        t = torch.randint(0, T, (n,), device=device)
        noise = torch.randn_like(x0)
        fake_tokens, c = self.fake_tokens(self.diffusion.q_sample(sample.detach(), t, noise), t, cond)
        out = self.fake_score.tdnet.head(fake_tokens, c)[:, :x0.shape[1]]
        target = self.diffusion.prediction_target(sample.detach(), noise, t, prediction_of(self.fake_score))
        terms["fake"] = mean_flat((out - target) ** 2).mean()
        real_tokens, _ = self.fake_tokens(self.diffusion.q_sample(x0, t, torch.randn_like(x0)), t, cond)
        terms["head"] = head_gan_loss(self.head(real_tokens), self.head(fake_tokens))
        terms["total"] = total + terms["fake"] + self.head_weight * terms["head"]
        return terms

    def update(self):
        """The fake score's and the head's optimizer step, gradients clipped to `grad_clip`."""
        params = [*self.fake_score.parameters(), *self.head.parameters()]
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1

    def run_state(self):
        """The fake score, the head, their optimizer and the count of their updates."""
        return {"fake_score": self.fake_score.state_dict(), "head": self.head.state_dict(),
                "optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_run_state(self, state):
        self.fake_score.load_state_dict(state["fake_score"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = state["updates"]


class frozen:
    """Within this context the modules' parameters take no gradient (gradients still flow through them)."""

    def __init__(self, *modules):
        self.params = [p for m in modules for p in m.parameters()]

    def __enter__(self):
        self.was = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, was in zip(self.params, self.was):
            p.requires_grad_(was)
