"""The workloads the benchmarks time and count, built with random weights at the real sizes: DINOv2-B/14, DINOv2-G/14
and the SD VAE; a training step as train_xmdpt.py runs it; inference through the Pipeline, stage by stage; and the
released code's guided sampling step, re-enacted on our weights: two separate forwards, each recomputing the
condition and pushing the source tokens through every block, with the released attention (explicit
softmax(q k^T * scale + bias) v, the relative position bias gathered from its table on every call).
"""
from dataclasses import replace

import torch

from devices import autocast
from inference import Pipeline
from models import XMDPT, XMDPT_CONFIGS, Diffusion
from models.encoders import DINOv2, Encoders, VAEFirstStage
from models.objective import XMDPTLoss
from models.tdnet import modulate
from models.xmdpt import GUIDANCE, guidance_scale

from .timing import peak_memory_gib, timed

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


def measure_inference(name, batch, device, steps, repeats, size=256, config=None, nets=None):
    """images/s of each stage of the Pipeline (encode, denoise, decode) and of the whole, and peak memory. The
    model is the preset `name`, or `config`; the encoders the real ones, or `nets`."""
    device = torch.device(device)
    nets = nets or real_encoders(device)
    model = XMDPT(config or replace(XMDPT_CONFIGS[name], input_size=size // nets.first_stage.downsample),
                  mipnet="none")
    pipe = Pipeline(model, nets, size, dict(steps=steps, **GUIDANCE, clip_denoised=False), device)
    sources = torch.rand(batch, 3, size, size) * 2 - 1
    skeletons = torch.rand(batch, 3, size, size)
    seeds = list(range(batch))
    inputs = pipe.encode(sources, skeletons, seeds)
    latents = pipe.sample(inputs)
    stages = (("encoders", lambda: pipe.encode(sources, skeletons, seeds)), ("sampling", lambda: pipe.sample(inputs)),
              ("decoding", lambda: pipe.decode(latents)),
              ("total", lambda: pipe(sources, skeletons=skeletons, seeds=seeds)))
    return {**{k: batch / timed(fn, device, repeats) for k, fn in stages}, "peak_gib": peak_memory_gib(device)}
