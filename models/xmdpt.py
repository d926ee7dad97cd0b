"""X-MDPT: TDNet conditioned by CANet, trained with MIPNet's masked cross-view prediction.

`XMDPTConfig` is the one description of the architecture: the model is built from it, checkpoints and exports
store it (`save_pretrained` writes it as config.json), and YAML's `model:` section sets its fields on top of a
preset (`XMDPT_CONFIGS`).
"""
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
from huggingface_hub import PyTorchModelHubMixin

from .canet import AGGREGATIONS, CANet
from .diffusion import NUM_TIMESTEPS, PREDICTIONS
from .mipnet import ATTENTIONS, MIPNet
from .tdnet import TDNet


@dataclass(frozen=True)
class XMDPTConfig(Mapping):
    """The architecture of an X-MDPT network. It is also a mapping of its fields, so that
    `XMDPT(**config)` and `dict(config, input_size=64)` work."""

    input_size: int = 32  # latent side: 32 for 256x256 images through the SD VAE, 64 for 512x512
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    learn_sigma: bool = True  # 2 x in_channels outputs: the prediction and the variance interpolation
    decode_layer: int = 2  # blocks after the decoder position embedding (the decoder); 2 in every released model
    mask_ratio: float = 0.3  # MIPNet: the share of target tokens the masked forward drops (training only)
    mipnet: str = "self-cross"  # MIPNet's attention: none (plain DiT), self (MDT), cross, cross-self, self-cross
    aggregation: str = "mlp"  # CANet: local, global, add, mlp
    cond_drop: float = 0.1  # probability of dropping the condition in training (classifier-free guidance)
    pose_dim: int = 768  # DINOv2 token widths: pose (B/14) and source image (G/14)
    image_dim: int = 1536
    dino_tokens: int = 257  # DINOv2's CLS token and 16x16 patches at 224x224
    prediction: str = "eps"  # what the first output channels predict: eps (the released models) or v
    consistency: bool = False  # a consistency model (models/consistency.py): guidance folded in, 1-8 steps

    def __post_init__(self):
        positive = [f.name for f in fields(self) if f.type in (int, float) and f.name not in
                    ("decode_layer", "mask_ratio", "cond_drop") and not getattr(self, f.name) > 0]
        problems = [f"{name} must be positive, got {getattr(self, name)}" for name in positive]
        choices = {"mipnet": ATTENTIONS, "aggregation": AGGREGATIONS, "prediction": PREDICTIONS}
        problems += [f"{name} must be one of {allowed}, got {getattr(self, name)!r}"
                     for name, allowed in choices.items() if getattr(self, name) not in allowed]
        rules = [(self.input_size % self.patch_size == 0,
                  f"input_size ({self.input_size}) must be a multiple of patch_size ({self.patch_size})"),
                 (self.hidden_size % self.num_heads == 0,
                  f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})"),
                 (self.hidden_size % 4 == 0,
                  f"hidden_size must be a multiple of 4 for the sin-cos embedding, got {self.hidden_size}"),
                 (0 <= self.decode_layer < self.depth,
                  f"decode_layer must be in [0, depth={self.depth}), got {self.decode_layer}"),
                 (0 < self.mask_ratio < 1, f"mask_ratio must be in (0, 1), got {self.mask_ratio}"),
                 (0 <= self.cond_drop <= 1, f"cond_drop must be in [0, 1], got {self.cond_drop}")]
        problems += [message for ok, message in rules if not ok]
        if problems:
            raise ValueError("invalid X-MDPT config: " + "; ".join(problems))

    def __getitem__(self, key):
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(self.__dataclass_fields__)

    def __len__(self):
        return len(self.__dataclass_fields__)


# Fields that change what training computes, not what inference computes: a checkpoint made without MIPNet
# (an inference export) fits a config with it.
TRAINING_ONLY = ("mask_ratio", "mipnet", "cond_drop")

_BASE = XMDPTConfig(input_size=32, in_channels=4, patch_size=2, mlp_ratio=4.0)
XMDPT_CONFIGS = {
    "XMDPT-S/2": replace(_BASE, depth=12, hidden_size=384, num_heads=6),
    "XMDPT-B/2": replace(_BASE, depth=12, hidden_size=768, num_heads=12),
    "XMDPT-L/2": replace(_BASE, depth=24, hidden_size=1024, num_heads=16),
    "XMDPT-XL/2": replace(_BASE, depth=28, hidden_size=1152, num_heads=16),
}


# The released power-cosine guidance's defaults: its scale s and power p.
GUIDANCE = {"cfg_scale": 2.0, "scale_pow": 0.01}


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


def _xavier_linear(module):
    """DiT's initialisation of a linear layer: Xavier-uniform weights, zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


MODEL_CARD = """---
{{ card_data }}
---

X-MDPT (Cross-view Masked Diffusion Transformers for Person Image Synthesis, ICML 2024) weights:
`config.json` (the XMDPTConfig) and `model.safetensors`. Load them with `models.load_checkpoint(folder)` or
`XMDPT.from_pretrained(folder)`, or pass the folder to `infer_xmdpt.py --ckpt`.
"""


class XMDPT(nn.Module, PyTorchModelHubMixin, library_name="xmdpt", tags=["pose-guided-person-synthesis"],
            model_card_template=MODEL_CARD):
    """Pose-guided person image diffusion transformer.

    Built from an `XMDPTConfig`, keyword arguments (its fields), or both (the keywords replace the config's
    fields). model(x, t, pose, image, source) predicts the noise, or v (`config.prediction`), and the variance
    interpolation for noisy latents x at timesteps t, given DINOv2 tokens of the target skeleton (`pose`), of
    the source image (`image`), and the scaled source latent (`source`).
    """

    def __init__(self, config: XMDPTConfig | None = None, **fields):
        super().__init__()
        config = XMDPTConfig(**fields) if config is None else replace(config, **fields)
        self.config = self._hub_mixin_config = config  # save_pretrained writes it as config.json
        c = config
        out_channels = 2 * c.in_channels if c.learn_sigma else c.in_channels
        self.tdnet = TDNet(c.input_size, c.patch_size, c.in_channels, c.hidden_size, c.depth, c.num_heads,
                           c.mlp_ratio, out_channels, c.decode_layer)
        self.canet = CANet(c.hidden_size, c.pose_dim, c.image_dim, self.tdnet.num_patches, c.dino_tokens,
                           c.aggregation)
        self.mipnet = None if c.mipnet == "none" else \
            MIPNet(c.hidden_size, c.num_heads, self.tdnet.side, c.mlp_ratio, c.mask_ratio, c.mipnet)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's rule for every linear layer (Xavier-uniform weights, zero biases), in one pass over the whole
        network, then each part's own initialisation; a seed draws the same numbers as the released code."""
        self.apply(_xavier_linear)
        for part in (self.tdnet, self.canet, self.mipnet):
            if part is not None:
                part.initialize_weights()

    @classmethod
    def _from_pretrained(cls, *, strict=True, **kwargs):
        """from_pretrained (huggingface_hub's mixin) loads strictly unless told otherwise."""
        return super()._from_pretrained(strict=strict, **kwargs)

    @property
    def prediction(self):
        """What the first output channels predict, 'eps' or 'v': Diffusion reads it from the model."""
        return self.config.prediction

    @property
    def consistency(self):
        """Whether this is a consistency model, distilled to sample in a few steps (models/consistency.py)."""
        return self.config.consistency

    @property
    def num_patches(self):
        """L, the tokens of one latent: (input_size / patch_size)^2."""
        return self.tdnet.num_patches

    def _check_condition(self, pose, image, source, n=None):
        """A ValueError naming the argument unless the condition's shapes fit this model (and n samples)."""
        c = self.config
        _expect("pose", pose, (n, c.dino_tokens, c.pose_dim))
        _expect("image", image, (pose.shape[0], c.dino_tokens, c.image_dim))
        _expect("source", source, (pose.shape[0], c.in_channels, c.input_size, c.input_size))

    def condition(self, pose, image, source):
        """CANet's unified condition vector y (N, D) for DINOv2 tokens and the scaled source latent."""
        return self.canet(pose, image, self.tdnet.embed(source))

    def condition_heads(self, pose, image, source):
        """Each CANet head's vector (N, D), by name (pose, global, local), before they are combined."""
        return self.canet.heads(pose, image, self.tdnet.embed(source))

    def forward(self, x, t, pose, image, source, drop_cond=None, mask=False, mask_noise=None):
        """x (N, C, H, W) noisy latents at timesteps t (N,) -> (N, out_channels, H, W).

        drop_cond: bool (N,), True = unconditional; None keeps all, except the random drop of probability
        `cond_drop` in train mode. mask: run the masked (MIPNet) forward; mask_noise (N, L) pins which tokens
        are kept (the smallest values).
        """
        c = self.config
        n = x.shape[0]
        _expect("x", x, (None, c.in_channels, c.input_size, c.input_size))
        _expect("t", t, (n,))
        self._check_condition(pose, image, source, n)
        if mask and self.mipnet is None:
            raise ValueError("mask=True needs MIPNet, but this model was built with mipnet='none'")
        if mask_noise is not None:
            _expect("mask_noise", mask_noise, (n, self.num_patches))
        source_tokens = self.tdnet.embed(source)  # (N, L, D) source latent patches + position
        y = self.canet(pose, image, source_tokens)  # (N, D) the unified condition
        if drop_cond is None and self.training and c.cond_drop > 0:
            drop_cond = torch.rand(n, device=x.device) < c.cond_drop
        if drop_cond is not None:
            _expect("drop_cond", drop_cond, (n,))
            y = y * (~drop_cond.bool()).to(y.dtype).unsqueeze(1)  # dropped: y = 0
        return self.denoise(x, t, y, source_tokens if mask else None, mask_noise)

    def denoise(self, x, t, y, source_tokens=None, mask_noise=None):
        """TDNet on noisy latents x (N, C, H, W) at timesteps t (N,) under the condition y (N, D) ->
        (N, out_channels, H, W). With the source tokens (N, L, D), the masked forward: the encoder sees the kept
        tokens (mask_noise (N, L) pins which) and MIPNet restores the sequence, attending to the source."""
        h, c = self.trunk(x, t, y, source_tokens, mask_noise)
        return self.tdnet.head(h, c)  # (N, out_channels, H, W)

    def trunk(self, x, t, y, source_tokens=None, mask_noise=None):
        """`denoise` up to the head: the tokens (N, L, D) after the last block, and c = t_emb + y (N, D)."""
        tdnet = self.tdnet
        h = tdnet.embed(x)  # (N, L, D) noisy target patches + position
        c = tdnet.t_embedder(t) + y  # (N, D)
        if source_tokens is None:
            h = tdnet.encode(h, c) + tdnet.decoder_pos_embed  # (N, L, D)
        else:
            h, ids_keep = self.mipnet.mask(h, mask_noise)  # (N, K, D), K = int(L (1 - mask_ratio))
            h = tdnet.encode(h, c, ids_keep)  # (N, K, D)
            context = None
            if self.mipnet.needs_context:
                with torch.no_grad():  # the source at the target's level, through the same encoder blocks
                    context = tdnet.encode(source_tokens, c)  # (N, L, D)
            h = self.mipnet(h, c, ids_keep, tdnet.decoder_pos_embed, context)  # (N, L, D)
        return tdnet.decode(h, c), c  # (N, L, D), (N, D)

    def compile_denoiser(self, **options):
        """Compile `denoise` (TDNet and MIPNet, where nearly all the work is) with torch.compile, for the life of
        this model: training and sampling both run through it. The first call of each kind (a training forward,
        a sampling step) compiles, which takes seconds to minutes; later calls with the same shapes do not.
        Returns the model."""
        self.denoise = torch.compile(self.denoise, **options)
        return self

    def guided(self, pose, image, source, cfg_scale=GUIDANCE["cfg_scale"], scale_pow=GUIDANCE["scale_pow"]):
        """A denoiser fn(x, t) -> (N, out_channels, H, W) with classifier-free guidance, for sampling.

        y is computed here, once per sample; each call runs the conditional and unconditional halves as one
        batch of 2N through TDNet only (no source path) and mixes them with the power-cosine scale of t, on
        all output channels. fn.prediction says what its first channels predict.
        """
        self._check_condition(pose, image, source)
        y = self.condition(pose, image, source)  # (N, D)
        y = torch.cat([y, torch.zeros_like(y)])  # (2N, D): conditional, then unconditional
        c = self.config

        def fn(x, t):
            _expect("x", x, (pose.shape[0], c.in_channels, c.input_size, c.input_size))
            cond, uncond = self.denoise(torch.cat([x, x]), torch.cat([t, t]), y).chunk(2)  # (N, out, H, W) each
            scale = guidance_scale(t, cfg_scale, scale_pow).to(cond.dtype).view(-1, 1, 1, 1)
            return uncond + scale * (cond - uncond)

        fn.prediction, fn.consistency = c.prediction, c.consistency
        return fn

    def conditioned(self, pose, image, source):
        """A denoiser fn(x, t) -> (N, out_channels, H, W) of the conditional forward alone, through TDNet only
        with y computed once: how a consistency model, whose guidance is folded into its weights, samples.
        fn.prediction and fn.consistency say what it is."""
        self._check_condition(pose, image, source)
        y = self.condition(pose, image, source)  # (N, D)
        c = self.config

        def fn(x, t):
            _expect("x", x, (pose.shape[0], c.in_channels, c.input_size, c.input_size))
            return self.denoise(x, t, y)

        fn.prediction, fn.consistency = c.prediction, c.consistency
        return fn

    def forward_with_cfg(self, x, t, pose, image, source, cfg_scale=GUIDANCE["cfg_scale"],
                         scale_pow=GUIDANCE["scale_pow"]):
        """The guided output (N, out_channels, H, W) of `guided` at x and t, in one call."""
        return self.guided(pose, image, source, cfg_scale, scale_pow)(x, t)
