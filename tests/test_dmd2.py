"""Distribution matching distillation (models/dmd2.py) against definitions written out here: the distribution
matching gradient with its normaliser and the stop-gradient trick that makes it a loss, the GAN losses' signs,
the two time scales, and backward simulation (which timesteps the student trains on, from what)."""
import math

import pytest
import torch
from test_consistency import ARCH, alpha_bar, condition, randomised, scalings, x0_of

from models import XMDPT, Diffusion
from models.dmd2 import DMD2, distribution_matching_loss, generator_gan_loss, head_gan_loss

TIMESTEPS = [999, 679, 339, 19]  # the 4-step student's (models/consistency.py lcm_timesteps)


def objective(prediction="v", ratio=5, gan_weight=3e-3, clip=False, seed=0):
    """A tiny teacher, a student and a fake score of its architecture with weights of their own."""
    teacher = randomised(XMDPT(**ARCH, prediction=prediction, mipnet="none"), seed)
    student = randomised(XMDPT(**ARCH, prediction=prediction, mipnet="none", consistency=True), seed + 1)
    fake = randomised(XMDPT(teacher.config), seed + 2)
    torch.manual_seed(seed + 3)  # the head's initialisation
    return DMD2(student, teacher, fake, Diffusion(), steps=4, ratio=ratio, cfg_scale=3.0, scale_pow=0.5,
                lr=1e-3, gan_weight=gan_weight, head_weight=1e-2, clip_denoised=clip)


def conditional(net, x, t, cond):
    """The network's conditional output channels (4) for a batch at timesteps t (N,)."""
    return net(x, t, **cond, drop_cond=torch.zeros(len(x), dtype=torch.bool))[:, :4]


def estimate(net, x, t, cond, prediction, clip=False):
    """The consistency function of net at timestep t (an int) for a batch, written out per sample."""
    c_skip, c_out = scalings(t)
    out = conditional(net, x, torch.full((len(x),), t), cond)
    x0 = torch.stack([x0_of(o, xi, t, prediction) for o, xi in zip(out, x)])
    return c_skip * x + c_out * (x0.clamp(-1, 1) if clip else x0)


def noised(x0, t, noise):
    """sqrt(a_t) x0 + sqrt(1 - a_t) noise, per sample (t (N,))."""
    return torch.stack([math.sqrt(alpha_bar(int(ti))) * xi + math.sqrt(1 - alpha_bar(int(ti))) * ni
                        for xi, ti, ni in zip(x0, t, noise)])


def guided_x0(teacher, x, t, cond, prediction, s=3.0, p=0.5):
    """The real score's clean estimate: power-cosine guidance on separate conditional and unconditional passes."""
    c = conditional(teacher, x, t, cond)
    u = teacher(x, t, **cond, drop_cond=torch.ones(len(x), dtype=torch.bool))[:, :4]
    scale = torch.tensor([1 + (s - 1) * (1 - math.cos(math.pi * (1 - ti / 1000) ** p)) / 2 for ti in t.tolist()])
    out = u + scale.view(-1, 1, 1, 1) * (c - u)
    return torch.stack([x0_of(o, xi, int(ti), prediction) for o, xi, ti in zip(out, x, t)])


def test_the_loss_gives_the_written_out_gradient():
    """d loss / d x0 = (fake - real) / mean|x0 - real| (per sample), over the values in the batch; the loss itself
    is 0.5 mean(grad^2), whatever x0's own values: the stop-gradient trick."""
    g = torch.Generator().manual_seed(0)
    x0, real, fake = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    x0.requires_grad_(True)
    loss = distribution_matching_loss(x0, real, fake)
    (grad,) = torch.autograd.grad(loss, x0)
    normaliser = torch.stack([(x0[i] - real[i]).abs().mean() for i in range(3)]).view(3, 1, 1, 1)
    written = (fake - real) / normaliser
    torch.testing.assert_close(grad, written / x0.numel(), rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(loss, 0.5 * (written ** 2).mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("prediction, clip", [("v", True), ("eps", False)])
def test_the_student_learns_the_written_out_score_difference(prediction, clip):
    """One student step, replayed from its draws: the student's sample is its consistency function after backward
    simulation, x_t its noising at t in [20, 980), real and fake the guided teacher's and the fake score's clean
    estimates there; `dm` is 0.5 mean(grad^2) with grad = (fake - real) / mean|x0 - real|, and the gradient
    that reaches the student's weights is that of grad / (values in the batch) through its sample (the GAN
    term weighs 0 here). The teacher, the fake score and the head get none from it."""
    dmd = objective(prediction, gan_weight=0.0, clip=clip)
    x0, cond = torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(9)) * 2 - 1, condition(2)
    torch.manual_seed(51)
    terms = dmd(x0, cond)
    others = [*dmd.fake_score.parameters(), *dmd.head.parameters()]
    student = list(dmd.student.parameters())
    grads = torch.autograd.grad(terms["dm"], student + others, allow_unused=True)
    assert all(g is None for g in grads[len(student):])  # the fake score and the head learn nothing from it

    torch.manual_seed(51)  # the objective's draws, replayed
    k = int(torch.randint(4, ()))
    x = torch.randn(x0.shape)
    with torch.no_grad():
        for t, t_next in zip(TIMESTEPS[:k], TIMESTEPS[1:k + 1]):
            x = noised(estimate(dmd.student, x, t, cond, prediction, clip), torch.full((2,), t_next),
                       torch.randn(x.shape))
    sample = estimate(dmd.student, x, TIMESTEPS[k], cond, prediction, clip)
    unclamped = estimate(dmd.student, x, TIMESTEPS[k], cond, prediction)  # the gradient passes the clamp
    t = torch.randint(20, 980, (2,))
    x_t = noised(sample.detach(), t, torch.randn(x0.shape))
    with torch.no_grad():
        real = guided_x0(dmd.teacher, x_t, t, cond, prediction)
        fake_out = conditional(dmd.fake_score, x_t, t, cond)
        fake = torch.stack([x0_of(o, xi, int(ti), prediction) for o, xi, ti in zip(fake_out, x_t, t)])
    normaliser = (sample.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    grad = (fake - real) / normaliser
    torch.testing.assert_close(terms["dm"], 0.5 * (grad ** 2).mean(), rtol=2e-4, atol=1e-8)
    written = torch.autograd.grad(unclamped, student, grad / sample.numel(), allow_unused=True)
    for got, want in zip(grads, written):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-6)


def test_the_gan_losses_push_the_student_towards_real():
    """softplus written out: the student's loss falls as the head calls its samples real (D up); the head's falls
    as it calls real images real and the student's fake."""
    real, fake = torch.tensor([0.3, -1.0], requires_grad=True), torch.tensor([-0.2, 2.0], requires_grad=True)
    softplus = lambda z: torch.log1p(torch.exp(z))
    student = generator_gan_loss(fake)
    torch.testing.assert_close(student, softplus(-fake).mean())
    (d_student,) = torch.autograd.grad(student, fake)
    assert (d_student < 0).all()  # gradient descent raises D(fake): towards real
    head = head_gan_loss(real, fake)
    torch.testing.assert_close(head, softplus(-real).mean() + softplus(fake).mean())
    d_real, d_fake = torch.autograd.grad(head, [real, fake])
    assert (d_real < 0).all() and (d_fake > 0).all()


def test_the_students_gan_term_reaches_the_student_only():
    """With the GAN term on, the student's gradient gains the GAN loss's, and the fake score and the head take
    none from it (they learn from `fake` and `head` only): compared with the same step at gan_weight 0."""
    x0, cond = torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(9)) * 2 - 1, condition(2)
    grads = {}
    for weight in (0.0, 1.0):
        dmd = objective(gan_weight=weight)
        torch.manual_seed(51)
        terms = dmd(x0, cond)
        terms["total"].backward()
        grads[weight] = ([p.grad.clone() for p in dmd.fake_score.parameters() if p.grad is not None],
                         [p.grad.clone() for p in dmd.head.parameters()],
                         [p.grad.clone() for p in dmd.student.parameters() if p.grad is not None])
        torch.testing.assert_close(terms["total"], terms["dm"] + weight * terms["gan"] + terms["fake"]
                                   + 1e-2 * terms["head"])
    for part in (0, 1):  # fake score, head: unchanged by the student's GAN term
        assert all(torch.equal(a, b) for a, b in zip(grads[0.0][part], grads[1.0][part]))
    assert any(not torch.equal(a, b) for a, b in zip(grads[0.0][2], grads[1.0][2]))


def test_the_fake_score_updates_every_step_the_student_every_ratio_th():
    """ratio 3 over 7 steps (each: forward, backward, the student's optimizer step, the objective's update): the
    student moves at steps 0, 3 and 6 only, and only then are its terms computed; the fake score and the head move
    at every step."""
    dmd = objective(ratio=3)
    opt = torch.optim.AdamW(dmd.student.parameters(), lr=1e-3)
    x0, cond = torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(9)) * 2 - 1, condition(2)
    snapshot = lambda m: [p.detach().clone() for p in m.parameters()]
    moved = lambda before, m: any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    student_moves, fake_moves, head_moves, computed = [], [], [], []
    for step in range(7):
        before = snapshot(dmd.student), snapshot(dmd.fake_score), snapshot(dmd.head)
        opt.zero_grad(set_to_none=True)
        terms = dmd(x0, cond)
        terms["total"].backward()
        opt.step()
        dmd.update()
        computed.append("dm" in terms and "gan" in terms)
        for moves, net, old in zip((student_moves, fake_moves, head_moves), (dmd.student, dmd.fake_score, dmd.head),
                                   before):
            moves.append(moved(old, net))
    assert student_moves == computed == [True, False, False, True, False, False, True]
    assert all(fake_moves) and all(head_moves) and dmd.updates == 7


def test_backward_simulation_trains_on_the_students_own_samples():
    """Over many draws, the student is run at 999, 679, 339, 19 in order, without gradient, down to the drawn
    timestep, and with gradient there only; each of the four is the one trained on in some draws."""
    dmd = objective()
    seen = []
    hook = dmd.student.register_forward_hook(
        lambda module, args, out: seen.append((int(args[1][0]), torch.is_grad_enabled())))
    x0, cond = torch.zeros(2, 4, 8, 8), condition(2)
    trained = set()
    for seed in range(12):
        seen.clear()
        torch.manual_seed(seed)
        with torch.enable_grad():
            sample, t = dmd.simulate(cond, x0.shape, x0.device)
        k = TIMESTEPS.index(t)
        assert seen == [(s, False) for s in TIMESTEPS[:k]] + [(t, True)]
        assert sample.requires_grad
        trained.add(t)
    hook.remove()
    assert trained == set(TIMESTEPS)


def test_a_student_started_at_the_last_step_samples_what_the_sampler_draws():
    """Backward simulation follows the consistency sampler: the sample at the last timestep is the 4-step
    sampler's image from the same noise (written out: each estimate noised to the next timestep)."""
    dmd = objective("v", clip=True)
    cond = condition(2)
    for seed in range(20):
        torch.manual_seed(seed)
        if int(torch.randint(4, ())) == 3:
            break
    torch.manual_seed(seed)
    with torch.no_grad():
        sample, t = dmd.simulate(cond, (2, 4, 8, 8), torch.device("cpu"))
        torch.manual_seed(seed)
        torch.randint(4, ())
        x = torch.randn(2, 4, 8, 8)
        for i, ti in enumerate(TIMESTEPS):
            x0 = estimate(dmd.student, x, ti, cond, "v", clip=True)
            if i + 1 < len(TIMESTEPS):
                x = noised(x0, torch.full((2,), TIMESTEPS[i + 1]), torch.randn(2, 4, 8, 8))
    assert t == 19
    torch.testing.assert_close(sample, x0, rtol=1e-4, atol=1e-5)
