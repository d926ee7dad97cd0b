"""X-MDPT: TDNet conditioned by CANet, trained with MIPNet's masked cross-view prediction."""
import math

import torch
import torch.nn as nn

from .canet import CANet
from .diffusion import PREDICTIONS
from .mipnet import ATTENTIONS, MIPNet
from .tdnet import TDNet

NUM_TIMESTEPS = 1000

_BASE = dict(input_size=32, in_channels=4, patch_size=2, mlp_ratio=4.0)
XMDPT_CONFIGS = {
    "XMDPT-S/2": dict(_BASE, depth=12, hidden_size=384, num_heads=6),
    "XMDPT-B/2": dict(_BASE, depth=12, hidden_size=768, num_heads=12),
    "XMDPT-L/2": dict(_BASE, depth=24, hidden_size=1024, num_heads=16),
    "XMDPT-XL/2": dict(_BASE, depth=28, hidden_size=1152, num_heads=16),
}


def guidance_scale(t, cfg_scale, scale_pow, num_timesteps=NUM_TIMESTEPS):
    """Power-cosine guidance: 1 + (s - 1) * (1 - cos(pi * (1 - t/T)^p)) / 2 for original timesteps t."""
    ramp = (1 - torch.cos(((1 - t / num_timesteps) ** scale_pow) * math.pi)) / 2
    return (cfg_scale - 1) * ramp + 1


def _expect(name, tensor, shape):
    """ValueError naming the argument unless tensor.shape matches shape (None = any size)."""
    got = tuple(tensor.shape)
    if len(got) != len(shape) or any(e is not None and e != g for e, g in zip(shape, got)):
        want = "(" + ", ".join("N" if e is None else str(e) for e in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {got}")


class XMDPT(nn.Module):
    """Pose-guided person image diffusion transformer.

    model(x, t, pose, image, source) predicts the noise (and, with learn_sigma, the variance interpolation)
    for noisy latents x at timesteps t, given DINOv2 tokens of the target skeleton (`pose`), of the source
    image (`image`), and the scaled source latent (`source`). Ablation switches: `mipnet` (attention of the
    side interpolater, 'none' = plain DiT training), `aggregation` (CANet), `mask_ratio`, and the DINOv2
    widths `pose_dim`/`image_dim`. `prediction` records what the first output channels predict, 'eps' (the
    released models) or 'v'; the model itself does not use it, Diffusion(prediction=...) reads it.
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, learn_sigma=True, mask_ratio=0.3, decode_layer=2, pose_dim=768,
                 image_dim=1536, mipnet="self-cross", aggregation="mlp", cond_drop=0.1, dino_tokens=257,
                 prediction="eps"):
        super().__init__()
        self.arch = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                         hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         learn_sigma=learn_sigma, mask_ratio=mask_ratio, decode_layer=decode_layer,
                         pose_dim=pose_dim, image_dim=image_dim, mipnet=mipnet, aggregation=aggregation,
                         cond_drop=cond_drop, dino_tokens=dino_tokens, prediction=prediction)
        if input_size % patch_size:
            raise ValueError(f"input_size ({input_size}) must be a multiple of patch_size ({patch_size})")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
        if not 0 <= decode_layer < depth:
            raise ValueError(f"decode_layer must be in [0, depth={depth}), got {decode_layer}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if mipnet not in ATTENTIONS:
            raise ValueError(f"mipnet must be one of {ATTENTIONS}, got {mipnet!r}")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.cond_drop = cond_drop
        self.tdnet = TDNet(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                           self.out_channels, decode_layer)
        grid = self.tdnet.x_embedder.grid
        self.canet = CANet(hidden_size, pose_dim, image_dim, grid * grid, dino_tokens, aggregation)
        self.mipnet = None if mipnet == "none" else \
            MIPNet(hidden_size, num_heads, grid, mlp_ratio, mask_ratio, mipnet)
        self.initialize_weights()

    def initialize_weights(self):
        def linear_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.apply(linear_init)
        td = self.tdnet
        w = td.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(td.x_embedder.proj.bias)
        for layer in (td.t_embedder.mlp[0], td.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        side = [self.mipnet.self_block, self.mipnet.cross_block] if self.mipnet is not None else []
        for block in list(td.blocks) + [b for b in side if b is not None] + [td.final_layer]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(td.final_layer.linear.weight)
        nn.init.zeros_(td.final_layer.linear.bias)
        heads = [h for h in (self.canet.pose, self.canet.glob, self.canet.local) if h is not None]
        for head in heads:
            if head.proj is not None:
                nn.init.normal_(head.proj[0].weight, std=0.02)
            nn.init.normal_(head.pool[0].weight, std=0.02)
        if self.canet.fuse is not None:
            nn.init.normal_(self.canet.fuse[0].weight, std=0.02)

    @property
    def num_patches(self):
        return self.tdnet.num_patches

    def _check_inputs(self, x, t, pose, image, source):
        size = self.arch["input_size"]
        _expect("x", x, (None, self.in_channels, size, size))
        n = x.shape[0]
        _expect("t", t, (n,))
        if t.numel() and not t.is_meta and (t.min() < 0 or t.max() > NUM_TIMESTEPS - 1):
            raise ValueError(f"t must lie in [0, {NUM_TIMESTEPS - 1}], got values in "
                             f"[{t.min().item()}, {t.max().item()}]")
        self._check_condition(pose, image, source, n)

    def _check_condition(self, pose, image, source, n=None):
        a = self.arch
        _expect("pose", pose, (n, a["dino_tokens"], a["pose_dim"]))
        _expect("image", image, (pose.shape[0], a["dino_tokens"], a["image_dim"]))
        _expect("source", source, (pose.shape[0], self.in_channels, a["input_size"], a["input_size"]))

    def condition(self, pose, image, source_tokens):
        """The unified condition vector y (N, D) from CANet."""
        return self.canet(pose, image, source_tokens)

    def forward(self, x, t, pose, image, source, drop_cond=None, mask=False, mask_noise=None):
        """drop_cond: bool (N,), True = unconditional; None keeps all, except the random drop of
        probability `cond_drop` in train mode. mask: run the masked (MIPNet) forward; mask_noise (N, L)
        pins which tokens are kept (the smallest values)."""
        self._check_inputs(x, t, pose, image, source)
        n = x.shape[0]
        source_tokens = self.tdnet.embed(source)
        y = self.condition(pose, image, source_tokens)
        if drop_cond is None and self.training and self.cond_drop > 0:
            drop_cond = torch.rand(n, device=x.device) < self.cond_drop
        if drop_cond is not None:
            _expect("drop_cond", drop_cond, (n,))
            y = y * (~drop_cond.bool()).to(y.dtype).unsqueeze(1)
        c = self.tdnet.t_embedder(t) + y
        h = self.tdnet.embed(x)
        if not mask:
            return self.tdnet(h, c)
        if self.mipnet is None:
            raise ValueError("mask=True needs MIPNet, but this model was built with mipnet='none'")
        if mask_noise is not None:
            _expect("mask_noise", mask_noise, (n, self.num_patches))
        kept, ids_keep = self.mipnet.mask(h, mask_noise)
        h = self.tdnet.encode(kept, c, ids_keep)
        context = None
        if self.mipnet.needs_context:
            with torch.no_grad():
                context = self.tdnet.encode(source_tokens, c)
        h = self.mipnet(h, c, ids_keep, self.tdnet.decoder_pos_embed, context)
        return self.tdnet.decode(h, c)

    def guided(self, pose, image, source, cfg_scale=2.0, scale_pow=0.01):
        """A denoiser fn(x, t) with classifier-free guidance for sampling.

        y is computed here once; each call runs the conditional and unconditional halves as one batch of
        2N through TDNet only (no source path), and mixes them with the power-cosine scale of t, on all
        output channels.
        """
        self._check_condition(pose, image, source)
        y = self.condition(pose, image, self.tdnet.embed(source))
        y = torch.cat([y, torch.zeros_like(y)])

        def fn(x, t):
            size = self.arch["input_size"]
            _expect("x", x, (pose.shape[0], self.in_channels, size, size))
            x2, t2 = torch.cat([x, x]), torch.cat([t, t])
            c = self.tdnet.t_embedder(t2) + y
            cond, uncond = self.tdnet(self.tdnet.embed(x2), c).chunk(2)
            scale = guidance_scale(t, cfg_scale, scale_pow).to(cond.dtype).view(-1, 1, 1, 1)
            return uncond + scale * (cond - uncond)
        return fn

    def forward_with_cfg(self, x, t, pose, image, source, cfg_scale=2.0, scale_pow=0.01):
        return self.guided(pose, image, source, cfg_scale, scale_pow)(x, t)
