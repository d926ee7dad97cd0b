"""Consistency distillation (models/consistency.py) against definitions written out here: the target (one guided
teacher DDIM step, then the EMA target's consistency function at the earlier timestep), the boundary
scalings, the sampler's timesteps and the noise it adds between steps, and the refusal of a mismatched
sampler."""
import math

import numpy as np
import pytest
import torch

from data.errors import InputError
from models import XMDPT, Diffusion
from models.consistency import ConsistencyDistillation, consistency_sample, lcm_timesteps

ARCH = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, pose_dim=16,
            image_dim=24, dino_tokens=5, cond_drop=0.0)


def randomised(model, seed):
    torch.manual_seed(seed)
    for p in model.parameters():
        p.data.normal_(0, 0.1)  # a fresh model outputs zeros
    return model


def condition(n=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    return dict(pose=torch.randn(n, 5, 16, generator=g), image=torch.randn(n, 5, 24, generator=g),
                source=torch.randn(n, 4, 8, 8, generator=g))


def distillation(prediction, clip=False, loss="huber", weighting="uniform"):
    """A tiny teacher, and a student and target network of its architecture with weights of their own (so that
    the test tells student, target and teacher apart)."""
    teacher = randomised(XMDPT(**ARCH, prediction=prediction), 0).eval()
    student = randomised(XMDPT(**ARCH, prediction=prediction, mipnet="none", consistency=True), 1)
    target = randomised(XMDPT(student.config), 2).requires_grad_(False)
    objective = ConsistencyDistillation(student, target, teacher, Diffusion(), cfg_scale=3.0, scale_pow=0.5,
                                        loss=loss, huber_c=0.01, weighting=weighting, clip_denoised=clip)
    return objective, student, target, teacher


def alpha_bar(t):
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return float(np.cumprod(1 - betas)[t])


def scalings(t):
    """LCM's boundary scalings, sigma_data 0.5, the timestep scaled by 10."""
    s = 10.0 * t
    return 0.25 / (s ** 2 + 0.25), s / math.sqrt(s ** 2 + 0.25)


def x0_of(out, x, t, prediction):
    a = alpha_bar(t)
    if prediction == "v":
        return math.sqrt(a) * x - math.sqrt(1 - a) * out
    return (x - math.sqrt(1 - a) * out) / math.sqrt(a)


def conditional(net, x, t, cond):
    return net(x[None], torch.tensor([t]), **{k: v[None] for k, v in cond.items()},
               drop_cond=torch.tensor([False]))[0, :4]


def consistency_function(net, x, t, cond, prediction, clip=False):
    """c_skip(t) x + c_out(t) x0, x0 the network's clean estimate (clamped to [-1, 1] with clip, as sampled)."""
    c_skip, c_out = scalings(t)
    x0 = x0_of(conditional(net, x, t, cond), x, t, prediction)
    return c_skip * x + c_out * (x0.clamp(-1, 1) if clip else x0)


def reference_target(teacher, target, x_t, t, cond, prediction, clip, s=3.0, p=0.5):
    """One sample's consistency target, from the definitions: the teacher's guided output at (x_t, t), one DDIM
    step to t - 20 (the grid's previous timestep; from the bottom one, 19, to the clean data, alpha_bar = 1, as
    the released sampler's last step), the target's consistency function there (the identity on clean data)."""
    t_prev = t - 20
    c = conditional(teacher, x_t, t, cond)
    u = teacher(x_t[None], torch.tensor([t]), **{k: v[None] for k, v in cond.items()},
                drop_cond=torch.tensor([True]))[0, :4]
    scale = 1 + (s - 1) * (1 - math.cos(math.pi * (1 - t / 1000) ** p)) / 2
    guided = u + scale * (c - u)
    a, a_prev = alpha_bar(t), alpha_bar(t_prev) if t_prev >= 0 else 1.0
    x0 = x0_of(guided, x_t, t, prediction)
    if clip:
        x0 = x0.clamp(-1, 1)
    eps = (x_t - math.sqrt(a) * x0) / math.sqrt(1 - a)
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x_prev if t_prev < 0 else consistency_function(target, x_prev, t_prev, cond, prediction, clip)


def written_out(student, target, teacher, x0, cond, prediction, clip):
    """The student's estimates and their targets for the draws of torch.manual_seed(51), from the definitions."""
    torch.manual_seed(51)  # the objective's draws, replayed: a grid index per sample, then the noise
    t = (torch.randint(0, 50, (4,)) + 1) * 20 - 1
    noise = torch.randn(x0.shape)
    assert t.tolist() == [19, 119, 999, 339]  # the bottom (its step lands on the clean data), the top, between
    with torch.no_grad():
        estimates, targets = [], []
        for i, ti in enumerate(t.tolist()):
            a = alpha_bar(ti)
            x_t = math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i]
            sample_cond = {k: v[i] for k, v in cond.items()}
            estimates.append(consistency_function(student, x_t, ti, sample_cond, prediction, clip))
            targets.append(reference_target(teacher, target, x_t, ti, sample_cond, prediction, clip))
    return torch.stack(estimates), torch.stack(targets)


@pytest.mark.parametrize("prediction, clip", [("eps", False), ("v", False), ("v", True)])
def test_the_loss_is_the_distance_to_the_written_out_target(prediction, clip):
    objective, student, target, teacher = distillation(prediction, clip)
    x0, cond = torch.rand(4, 4, 8, 8, generator=torch.Generator().manual_seed(9)) * 2 - 1, condition(4)
    torch.manual_seed(51)
    terms = objective(x0, cond)
    estimates, targets = written_out(student, target, teacher, x0, cond, prediction, clip)
    huber = (((estimates - targets) ** 2 + 0.01 ** 2).sqrt() - 0.01).mean()
    torch.testing.assert_close(terms["huber"], huber, rtol=2e-4, atol=1e-7)
    torch.testing.assert_close(terms["mse"], ((estimates - targets) ** 2).mean(), rtol=2e-4, atol=1e-9)
    assert terms["total"] is terms["huber"] and objective.terms == ("total", "huber", "mse")
    terms["total"].backward()  # only the student learns
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in [*target.parameters(), *teacher.parameters()])


def test_l2_loss_is_the_mean_squared_distance():
    objective, student, target, teacher = distillation("eps", loss="l2")
    x0, cond = torch.rand(4, 4, 8, 8, generator=torch.Generator().manual_seed(9)) * 2 - 1, condition(4)
    torch.manual_seed(51)
    terms = objective(x0, cond)
    estimates, targets = written_out(student, target, teacher, x0, cond, "eps", False)
    torch.testing.assert_close(terms["total"], ((estimates - targets) ** 2).mean(), rtol=2e-4, atol=1e-9)
    assert objective.terms == ("total", "mse") and terms["total"] is terms["mse"]


def test_ict_weighting_weighs_each_pair_by_one_over_its_step_in_noise_level():
    """weighting='ict': each sample's distance times 1 / (sigma(t) - sigma(t - 20)), sigma = sqrt((1 - a) / a)
    (0 on the clean data below the grid), the weights of the 50 grid timesteps averaging 1."""
    objective, student, target, teacher = distillation("v", weighting="ict")
    x0, cond = torch.rand(4, 4, 8, 8, generator=torch.Generator().manual_seed(9)) * 2 - 1, condition(4)
    torch.manual_seed(51)
    terms = objective(x0, cond)
    estimates, targets = written_out(student, target, teacher, x0, cond, "v", False)

    def sigma(t):
        return 0.0 if t < 0 else math.sqrt((1 - alpha_bar(t)) / alpha_bar(t))

    raw = {t: 1 / (sigma(t) - sigma(t - 20)) for t in range(19, 1000, 20)}
    weights = torch.tensor([raw[t] / np.mean(list(raw.values())) for t in (19, 119, 999, 339)], dtype=torch.float32)
    assert weights[0] > 100 * weights[2]  # the pair next to the data weighs far more than the one from noise
    huber = (((estimates - targets) ** 2 + 0.01 ** 2).sqrt() - 0.01).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["huber"], (weights * huber).mean(), rtol=2e-4, atol=1e-7)


def test_the_consistency_function_is_the_identity_at_zero_and_the_estimate_above():
    """c_skip(0) = 1, c_out(0) = 0: f(x, 0) = x whatever the network says; from the grid's first timestep up,
    f is (all but) the network's clean estimate."""
    objective, student, *_ = distillation("v")
    x, cond = torch.randn(3, 4, 8, 8), condition()
    with torch.no_grad():
        at_zero = objective.consistency_function(student, x, torch.zeros(3, dtype=torch.long), cond)
        assert torch.equal(at_zero, x)
        c_skip, c_out = objective.consistency_function.scalings(torch.tensor([0.0, 19.0, 999.0], dtype=torch.float64))
        assert (c_skip[0], c_out[0]) == (1.0, 0.0)
        assert c_skip[1] < 1e-5 and c_skip[2] < 1e-8 and 1 - c_out[1] < 1e-5
        for t in (19, 999):
            written = torch.stack([consistency_function(student, x[i], t, {k: v[i] for k, v in cond.items()}, "v")
                                   for i in range(3)])
            torch.testing.assert_close(objective.consistency_function(student, x, torch.full((3,), t), cond), written,
                                       rtol=1e-4, atol=1e-6)


class Recorded:
    """A consistency model's conditional denoiser that records the timesteps it is asked at."""
    prediction, consistency = "eps", True

    def __init__(self):
        self.seen = []

    def __call__(self, x, t):
        self.seen.append(t.tolist())
        return torch.sin(2 * x) + t.float().view(-1, 1, 1, 1) / 1000


@pytest.mark.parametrize("steps, timesteps", [(1, [999]), (2, [999, 19]), (3, [999, 499, 19]), (4, [999, 679, 339, 19]),
                                              (8, [999, 859, 719, 579, 439, 299, 159, 19])])
def test_the_sampler_visits_the_grid_and_adds_each_samples_own_noise(steps, timesteps):
    """The timesteps are evenly spaced over the grid 20 i - 1, its top and bottom included. From noise z: at
    each the consistency function's estimate, then sqrt(a') x0 + sqrt(1 - a') n at the next timestep, n drawn
    from the sample's own generator (so a sample is the same in any batch); the last step returns the estimate.
    Written out here with LCM's scalings and the schedule's alpha_bar."""
    fn, z = Recorded(), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    generators = [torch.Generator().manual_seed(s) for s in (11, 12)]
    out = consistency_sample(Diffusion(), fn, z, steps, generators)
    assert fn.seen == [[t, t] for t in timesteps]
    replay = [torch.Generator().manual_seed(s) for s in (11, 12)]
    x = z.clone()
    for i, t in enumerate(timesteps):
        eps = torch.sin(2 * x) + t / 1000
        c_skip, c_out = scalings(t)
        x0 = c_skip * x + c_out * (x - math.sqrt(1 - alpha_bar(t)) * eps) / math.sqrt(alpha_bar(t))
        if i + 1 < len(timesteps):
            a = alpha_bar(timesteps[i + 1])
            noise = torch.stack([torch.randn(4, 8, 8, generator=g) for g in replay])
            x = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-5)
    alone = consistency_sample(Diffusion(), Recorded(), z[1:], steps, [torch.Generator().manual_seed(12)])
    torch.testing.assert_close(alone, out[1:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", [0, 51])
def test_the_sampler_refuses_step_counts_the_grid_cannot_give(steps):
    with pytest.raises(InputError, match=rf"sampling steps of a consistency model must be in \[1, 50\], got {steps}"):
        lcm_timesteps(1000, steps)


def test_each_sampler_refuses_the_other_kind_of_model():
    d, z, cond = Diffusion(), torch.randn(1, 4, 8, 8), condition(1)
    teacher = XMDPT(**ARCH).eval()
    student = XMDPT(**ARCH, mipnet="none", consistency=True).eval()
    with pytest.raises(TypeError, match="consistency_sample samples consistency models; this is a diffusion model"):
        consistency_sample(d, teacher.conditioned(**cond), z, 4)
    for sampler in (d.ddim_sample, d.dpm_solver_sample):
        with pytest.raises(TypeError, match="samples diffusion models; this is a consistency model"):
            sampler(student.conditioned(**cond), z, steps=4)
    assert student.conditioned(**cond).consistency and not teacher.guided(**cond).consistency
    consistency_sample(d, student.conditioned(**cond), z, 2)


def test_the_student_knows_what_it_is(tmp_path):
    """The consistency flag travels with the weights, like the prediction type: an export reads back as a
    consistency model, and the objective refuses a config that does not match its teacher."""
    from models import export, load_checkpoint
    student = XMDPT(**ARCH, mipnet="none", consistency=True, prediction="v")
    export(student, tmp_path / "student")
    loaded = load_checkpoint(tmp_path / "student")
    assert loaded.consistency and loaded.prediction == "v" and loaded.config == student.config
