"""The workloads the benchmarks time and count, built with random weights at the real sizes: DINOv2-B/14, DINOv2-G/14
and the SD VAE; a training step as train_xmdpt.py runs it; inference through the Pipeline, stage by stage; and the
released code's guided sampling step, re-enacted on our weights: two separate forwards, each recomputing the
condition and pushing the source tokens through every block, with the released attention (explicit
softmax(q k^T * scale + bias) v, the relative position bias gathered from its table on every call).
"""
import time
from dataclasses import replace

import torch

from devices import autocast
from inference import Pipeline
from models import XMDPT, XMDPT_CONFIGS, Diffusion
from models.encoders import DINOv2, Encoders, VAEFirstStage
from models.objective import XMDPTLoss
from models.tdnet import modulate
from models.xmdpt import GUIDANCE, guidance_scale

from .timing import gflops, peak_memory_gib, sync, timed

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=256)


def released_block(block, x, c):
    """One block as the released code computes it: explicit attention, the bias gathered on every call."""
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = block.adaLN_modulation(c).chunk(6, dim=1)
    attn, (n, length, dim) = block.attn, x.shape
    qkv = attn.qkv(modulate(block.norm1(x), shift_a, scale_a)).reshape(n, length, 3, attn.num_heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + attn.rel_pos_bias._compute()
    h = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, length, dim)
    x = x + gate_a.unsqueeze(1) * attn.proj(h)
    return x + gate_m.unsqueeze(1) * block.mlp(modulate(block.norm2(x), shift_m, scale_m))


def released_guided_step(model, x, t, pose, image, source, cfg_scale, scale_pow):
    """The released forward_with_cfg's work: an unconditional and a conditional forward, separately."""
    td = model.tdnet
    outs = []
    for drop in (True, False):
        src = td.embed(source)
        y = model.canet(pose, image, src)
        c = td.t_embedder(t) + (y * 0 if drop else y)
        h = td.embed(x)
        for i, block in enumerate(td.blocks):
            if i == td.split:
                h = h + td.decoder_pos_embed
            h = released_block(block, h, c)
            src = released_block(block, src, c)
        outs.append(td.unpatchify(td.final_layer(h, c)))
    uncond, cond = outs
    return uncond + guidance_scale(t, cfg_scale, scale_pow).view(-1, 1, 1, 1) * (cond - uncond)


def random_inputs(model, n, device):
    """(x, t, condition) of random values for n samples of `model`: noisy latents, t = 500, DINOv2 tokens and a
    source latent."""
    c = model.config
    s = c.input_size
    return (torch.randn(n, c.in_channels, s, s, device=device), torch.full((n,), 500, device=device),
            dict(pose=torch.randn(n, c.dino_tokens, c.pose_dim, device=device),
                 image=torch.randn(n, c.dino_tokens, c.image_dim, device=device),
                 source=torch.randn(n, c.in_channels, s, s, device=device)))


def real_encoders(device, pose="vitb14", image="vitg14", vae=SD_VAE, depth=None):
    """DINOv2-B/14, DINOv2-G/14 and the SD VAE with random weights, built on `device`: the real networks' work
    (other variants, depths and VAE configs give small stand-ins)."""
    with torch.device(device):
        return Encoders(DINOv2(pose, "random", depth), DINOv2(image, "random", depth), VAEFirstStage.from_config(vae))


def measure_training(name, batch, device, cached, repeats, size=256, config=None, nets=None):
    """steps/s and peak memory of a training step as train_xmdpt.py runs it: the encoders' features of a
    batch of size x size pixels (or, with the cache, features ready), the objective, its backward, AdamW and the
    EMA. The model is the preset `name` at that size, or `config`; the encoders are the real ones, or `nets`."""
    device = torch.device(device)
    if nets is None:  # with the cache, a step needs only the first stage, as train_xmdpt.py keeps it
        nets = Encoders(None, None, VAEFirstStage.from_config(SD_VAE)).to(device) if cached else real_encoders(device)
    model = XMDPT(config or replace(XMDPT_CONFIGS[name], input_size=size // nets.first_stage.downsample)).to(device)
    objective = XMDPTLoss(model, Diffusion())
    ema = XMDPT(model.config).to(device).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    if cached:  # what a feature cache holds for the batch: no encoder runs, the first stage samples latents
        c = model.config
        moments = lambda: torch.randn(batch, c.in_channels, c.input_size, c.input_size, device=device)
        batch_data = {"pose": torch.randn(batch, c.dino_tokens, c.pose_dim, device=device),
                      "image": torch.randn(batch, c.dino_tokens, c.image_dim, device=device),
                      "target_mean": moments(), "target_logvar": moments(), "source_mean": moments(),
                      "source_logvar": moments()}
    else:
        batch_data = {"target": pixels, "source": pixels, "target_skeleton": pixels * 0.5 + 0.5}

    def step():  # train_xmdpt.py's step
        x0, cond = nets.training_inputs(batch_data, cached)
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            loss = objective(x0, cond)["total"]
        loss.backward()
        opt.step()
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - 0.9999)  # the EMA

    sec = timed(step, device, repeats)
    return {"steps_per_s": 1 / sec, "peak_gib": peak_memory_gib(device)}


STAGES = ("skeleton encoder", "source encoders", "sampling", "decoding")


def stage_work(config, steps, student, size=256, encoders=real_encoders):
    """GFLOP per image of each stage of an inference of `config` at `size`, counted on the meta device: DINOv2-B on
    the target skeleton; DINOv2-G and the VAE encoder on the source; `steps` sampling steps, each a guided
    evaluation (two) of a diffusion model or one conditional evaluation of a `student`; the VAE decoder.
    `encoders(device)` builds the encoders (the real ones, or small stand-ins)."""
    with torch.device("meta"):
        nets = encoders("meta")
        model = XMDPT(config, mipnet="none", consistency=student)
        x, t, cond = random_inputs(model, 1, "meta")
        pixels = torch.randn(1, 3, size, size)
        evaluate = model.conditioned(**cond) if student else model.guided(**cond)
        return {"skeleton encoder": gflops(lambda: nets.pose(pixels)),
                "source encoders": gflops(lambda: (nets.image(pixels), nets.first_stage.moments(pixels))),
                "sampling": steps * gflops(lambda: evaluate(x, t)),
                "decoding": gflops(lambda: nets.first_stage.decode(x[:, :4]))}


def timed_stages(pipe, photo, skeletons, settings, reuse, seed=0):
    """One photo in N poses through `pipe`, each stage timed once: the skeletons' encoder, the photo's (once for
    all N with `reuse`, else once per pose, as N separate images would), sampling, decoding. -> (images,
    {stage: seconds})."""
    seconds = {}

    def stage(name, fn):
        sync(pipe.device)
        tic = time.perf_counter()
        out = fn()
        sync(pipe.device)
        seconds[name] = time.perf_counter() - tic
        return out

    n = len(skeletons)
    poses = stage("skeleton encoder", lambda: pipe.encode_poses(skeletons))
    if reuse:
        features = stage("source encoders", lambda: pipe.encode_sources(photo[None]))
        sources = {k: v.expand(n, *v.shape[1:]) for k, v in features.items()}
    else:
        sources = stage("source encoders", lambda: pipe.encode_sources(photo.expand(n, -1, -1, -1)))
    inputs = pipe.pair_inputs(sources, poses, [seed] * n)
    latents = stage("sampling", lambda: pipe.sample(inputs, settings=settings))
    return stage("decoding", lambda: pipe.decode(latents)), seconds


def measure_inference(name, poses, device, size=256, config=None, nets=None, ddim_steps=50, student_steps=4):
    """One photo in `poses` poses, three ways, each stage timed: the diffusion model with DDIM-`ddim_steps` and
    the photo encoded per image (as separate images are made), a `student_steps` student encoding per image, and
    the student with the photo encoded once. The model is the preset `name` (the student its consistency twin,
    random weights both), or `config`; the encoders the real ones, or `nets`. -> {variant: {stage: seconds}},
    whether the student's images are the same with and without reuse, and the peak memory."""
    device = torch.device(device)
    nets = nets or real_encoders(device)
    config = config or replace(XMDPT_CONFIGS[name], input_size=size // nets.first_stage.downsample)
    torch.manual_seed(0)
    teacher = Pipeline(XMDPT(config, mipnet="none"), nets, size,
                       dict(steps=ddim_steps, **GUIDANCE, clip_denoised=False), device)
    student = Pipeline(XMDPT(config, mipnet="none", consistency=True), nets, size,
                       dict(steps=student_steps, **GUIDANCE, clip_denoised=False), device)
    photo, skeletons = torch.rand(3, size, size) * 2 - 1, torch.rand(poses, 3, size, size)
    student.sample(student.encode(photo[None], skeletons[:1], [0]))  # warm-up: allocator, kernels
    results, images = {}, {}
    for variant, pipe, reuse in (("ddim", teacher, False), ("student", student, False),
                                 ("student, photo encoded once", student, True)):
        images[variant], results[variant] = timed_stages(pipe, photo, skeletons, pipe.settings(), reuse)
    return {"seconds": results, "identical": bool(torch.equal(images["student"],
                                                              images["student, photo encoded once"])),
            "peak_gib": peak_memory_gib(device)}
