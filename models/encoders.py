"""The frozen encoders of X-MDPT: DINOv2 for the pose and source-image tokens, the SD VAE for latents.

Weights only ever come from local files (no downloads). For tests and the demo, every encoder can also be
built with random weights, through the same classes and code paths.
"""
import inspect
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models import AutoencoderKL
from safetensors.torch import load_file
from timm.models.vision_transformer import checkpoint_filter_fn

from data.errors import InputError, MissingFileError
from devices import autocast

# DINOv2 variants: the timm architecture and the width of its tokens.
DINOV2 = {
    "vits14": ("vit_small_patch14_dinov2", 384),
    "vitb14": ("vit_base_patch14_dinov2", 768),
    "vitl14": ("vit_large_patch14_dinov2", 1024),
    "vitg14": ("vit_giant_patch14_dinov2", 1536),
}
DINOV2_SIZE = 224  # input resolution of the released models: 16x16 patches of 14 pixels
DINOV2_PATCH = 14
LATENT_SCALE = 0.18215  # SD VAE latent scale, as the released models were trained with
SD_VAE_GEOMETRY = (8, 4)  # the SD VAE's downsampling and latent channels


class Frozen(nn.Module):
    """A pretrained network that is never trained: no gradients, and eval mode whatever its parent asks."""

    def freeze(self):
        """No gradients and eval mode; returns self."""
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode=True):
        """Stays in eval mode whatever `mode` says (dropout and the like never run in a frozen network)."""
        return super().train(False)


# ---------------------------------------------------------------------------------------------------------
# DINOv2
# ---------------------------------------------------------------------------------------------------------

def dinov2_width(variant):
    """The token width of a DINOv2 variant (vits14, vitb14, vitl14, vitg14)."""
    if variant not in DINOV2:
        raise InputError(f"unknown DINOv2 variant {variant!r}; expected one of {sorted(DINOV2)}")
    return DINOV2[variant][1]


def check_dinov2_weights(variant, weights):
    """Validate a DINOv2 entry before anything is built: a known variant, and an existing file or "random"."""
    dinov2_width(variant)
    if weights == "random":
        return
    if weights is None:
        raise InputError(f"DINOv2 {variant}: weights must be a local file, or 'random' (tests and demo only)")
    if not Path(weights).is_file():
        raise MissingFileError(
            f"DINOv2 {variant} weights not found: {weights}. Get the original checkpoint from "
            f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{variant}/dinov2_{variant}_pretrain.pth "
            f"(facebookresearch/dinov2), or use timm's {DINOV2[variant][0]}.lvd142m safetensors file."
        )


def dinov2_tokens(size):
    """The tokens DINOv2 gives for a size x size input: the CLS token and (size / 14)^2 patches (257 at 224). An
    InputError unless size is a positive multiple of the patch, 14."""
    if not (isinstance(size, int) and size > 0 and size % DINOV2_PATCH == 0):
        raise InputError(f"a DINOv2 input size must be a positive multiple of {DINOV2_PATCH}, got {size!r}")
    return (size // DINOV2_PATCH) ** 2 + 1


def dino_input(x, size=DINOV2_SIZE):
    """Images (N, 3, H, W) resized to the DINOv2 input size (224x224 for the released models), as float32.

    Bicubic without antialiasing, as torchvision 0.13's tensor `Resize` did in training. Values are kept
    as they are: images in [-1, 1] and skeletons in [0, 1], with no ImageNet normalisation.
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"DINOv2 expects images of shape (N, 3, H, W), got {tuple(x.shape)}")
    return F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False,
                         antialias=False)


def resample_pos_embed(pos_embed, side):
    """Resample the patch position embedding to a side x side token map the way DINOv2 does at run time.

    DINOv2's interpolate_pos_encoding: bicubic, scale factor (side + 0.1) / old side, no antialiasing, in
    float32, and nothing at all when the map already fits. Doing it once before loading gives the torch.hub
    model's features exactly; timm's own resampling (to the target size, antialiased) does not.
    """
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    old = round(patch_pos.shape[1] ** 0.5)
    if old == side:
        return pos_embed
    dim = pos_embed.shape[-1]
    patch_pos = patch_pos.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, scale_factor=(side + 0.1) / old, mode="bicubic", antialias=False)
    assert patch_pos.shape[-2:] == (side, side), patch_pos.shape
    return torch.cat([cls_pos.float(), patch_pos.flatten(2).transpose(1, 2)], dim=1)


def load_dinov2_state_dict(path, net):
    """An original DINOv2 .pth or a timm .safetensors/.pth file, as a float32 state dict for `net`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], net.patch_embed.grid_size[0])
    # timm's filter renames the original keys (drops mask_token, mlp.w12/w3 -> fc1/fc2 for vitg14); the map
    # already fits, so it leaves the positions alone.
    return checkpoint_filter_fn(state, net)


class DINOv2(Frozen):
    """DINOv2 tokens at size x size (224 for the released models): (N, 1 + (size/14)^2, dim), the CLS token then
    the patch tokens (16x16 at 224), taken after the last block and the final norm, as the torch.hub model's
    get_intermediate_layers(x, 1, return_class_token=True) gives them. Input: images (N, 3, H, W) of any size,
    resized here by `dino_input` as the released code fed them (the [-1, 1] image or the [0, 1] skeleton, no
    ImageNet normalisation). `size` other than 224 is for models trained so, like the demo's small encoders
    that look at 32-pixel figures; original weights are resampled to its map of patches as DINOv2 does.
    """

    def __init__(self, variant, weights, depth=None, size=DINOV2_SIZE):
        super().__init__()
        check_dinov2_weights(variant, weights)
        dinov2_tokens(size)
        overrides = {} if depth is None else {"depth": depth}
        self.net = timm.create_model(DINOV2[variant][0], img_size=size, num_classes=0, **overrides)
        if weights != "random":
            self.net.load_state_dict(load_dinov2_state_dict(weights, self.net))
        self.dim, self.size = self.net.embed_dim, size
        self.freeze()

    @torch.no_grad()
    def forward(self, x):
        x = dino_input(x, self.size)  # (N, 3, size, size)
        with autocast(x.device):
            return self.net.forward_features(x).float()  # (N, 1 + (size/14)^2, dim)


# ---------------------------------------------------------------------------------------------------------
# First stage: the SD VAE, or the identity for diffusion on pixels
# ---------------------------------------------------------------------------------------------------------

class FirstStage(Frozen):
    """Interface of a first stage. encode: image in [-1, 1] -> scaled latent; decode: the inverse.

    moments(x) gives the posterior (mean, logvar) for a feature cache; sample_from_moments turns them into
    the same scaled latent encode() gives (the same random numbers for the same generator).
    """

    scale = 1.0

    @torch.no_grad()
    def sample_from_moments(self, mean, logvar, generator=None):
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + torch.exp(0.5 * logvar) * noise) * self.scale

    def encode(self, x, generator=None):
        return self.sample_from_moments(*self.moments(x), generator=generator)


class IdentityFirstStage(FirstStage):
    """Diffusion directly on pixels. The posterior has zero variance (logvar = -inf), so sampling is exact."""

    latent_channels = 3
    downsample = 1

    def __init__(self):
        super().__init__()
        self.freeze()

    def moments(self, x):
        return x, torch.full_like(x, float("-inf"))

    def decode(self, z):
        return z


def check_vae_dir(path):
    """A MissingFileError naming `path` and where the VAE is published, unless it holds a diffusers config.json."""
    if not (Path(path) / "config.json").is_file():
        raise MissingFileError(
            f"VAE not found: {path} (a diffusers AutoencoderKL directory with config.json). Get "
            f"stabilityai/sd-vae-ft-mse from the Hugging Face Hub, or the decoder-fine-tuned VAE of the "
            f"X-MDPT release (github.com/trungpx/xmdpt), and save it there."
        )


def load_autoencoder(path):
    """The diffusers AutoencoderKL saved in a local directory (no download)."""
    check_vae_dir(path)
    return AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)


class VAEFirstStage(FirstStage):
    """The SD VAE (diffusers AutoencoderKL); latents are a posterior sample times 0.18215.

    decode() returns the raw decoder output: nominally [-1, 1], it can overshoot slightly; it is not clamped
    here (as in the released code), so clamp when turning it into pixels.
    """

    scale = LATENT_SCALE

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.latent_channels = vae.config.latent_channels
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.freeze()

    @classmethod
    def from_pretrained(cls, path):
        return cls(load_autoencoder(path))

    @classmethod
    def from_config(cls, config):
        """A randomly initialised AutoencoderKL (under the current torch seed), for tests."""
        return cls(AutoencoderKL(**config))

    @torch.no_grad()
    def moments(self, x):
        with autocast(x.device):
            posterior = self.vae.encode(x).latent_dist
        return posterior.mean.float(), posterior.logvar.float()

    @torch.no_grad()
    def decode(self, z):
        with autocast(z.device):
            return self.vae.decode(z / self.scale).sample.float()


# ---------------------------------------------------------------------------------------------------------
# The builder used by training and inference
# ---------------------------------------------------------------------------------------------------------

class Encoders(nn.Module):
    """pose(skeletons) -> (N, 257, pose_dim), image(images) -> (N, 257, image_dim), first_stage."""

    def __init__(self, pose, image, first_stage):
        super().__init__()
        self.pose, self.image, self.first_stage = pose, image, first_stage

    @torch.no_grad()
    def features(self, target, source, skeleton):
        """What a training step needs of a batch of pairs (N, 3, S, S): the DINOv2 tokens of the target's
        skeleton and of the source, and the first stage's posterior moments of both images. A feature cache
        (data/cache.py) stores the same, so both give one layout."""
        target_mean, target_logvar = self.first_stage.moments(target)
        source_mean, source_logvar = self.first_stage.moments(source)
        return {"pose": self.pose(skeleton), "image": self.image(source), "target_mean": target_mean,
                "target_logvar": target_logvar, "source_mean": source_mean, "source_logvar": source_logvar}

    @torch.no_grad()
    def training_inputs(self, batch, cached):
        """(x0, cond) of a training batch: the target latent and the model's condition (`pose`, `image` tokens
        and the `source` latent). The batch holds pixels (`target`, `source`, `target_skeleton`), or, when
        `cached`, a feature cache's entries. Either way a fresh latent of the target, then of the source, is
        sampled from the posterior moments, as the released models were trained."""
        f = batch if cached else self.features(batch["target"], batch["source"], batch["target_skeleton"])
        x0 = self.first_stage.sample_from_moments(f["target_mean"], f["target_logvar"])
        source = self.first_stage.sample_from_moments(f["source_mean"], f["source_logvar"])
        return x0, {"pose": f["pose"], "image": f["image"], "source": source}


def first_stage_geometry(cfg):
    """(downsampling, latent channels) of a first stage's config, without building or reading anything: the
    identity keeps the 3 pixel channels; a VAE is the SD VAE's 8x and 4 channels unless its section says
    otherwise (`downsample`, `latent_channels`), or its `random` config (tests) says."""
    if cfg["type"] == "identity":
        return 1, IdentityFirstStage.latent_channels
    if cfg["type"] != "vae":
        raise InputError(f"unknown first stage type {cfg['type']!r}; expected 'vae' or 'identity'")
    if cfg.get("path") is None and cfg.get("random") is not None:
        defaults = {k: p.default for k, p in inspect.signature(AutoencoderKL.__init__).parameters.items()}
        config = {**defaults, **cfg["random"]}
        return 2 ** (len(config["block_out_channels"]) - 1), config["latent_channels"]
    return cfg.get("downsample", SD_VAE_GEOMETRY[0]), cfg.get("latent_channels", SD_VAE_GEOMETRY[1])


def _build_first_stage(cfg):
    """The first stage of an `encoders.first_stage` section, checked against the geometry the config states."""
    if cfg["type"] == "identity":
        return IdentityFirstStage()
    if cfg["type"] != "vae":
        raise InputError(f"unknown first stage type {cfg['type']!r}; expected 'vae' or 'identity'")
    if cfg.get("path") is not None:
        first_stage = VAEFirstStage.from_pretrained(cfg["path"])
        found, expected = (first_stage.downsample, first_stage.latent_channels), first_stage_geometry(cfg)
        if found != expected:
            raise InputError(f"the VAE in {cfg['path']} downsamples {found[0]}x into {found[1]} channels, but "
                             f"encoders.first_stage says {expected[0]}x and {expected[1]} (the SD VAE's unless it "
                             f"sets downsample and latent_channels)")
        return first_stage
    if cfg.get("random") is not None:
        return VAEFirstStage.from_config(cfg["random"])
    raise InputError("first_stage: give the VAE 'path' (or a 'random' config, for tests only)")


def build_encoders(cfg, device="cpu"):
    """The frozen encoders from a config such as
    {"pose": {"dinov2": "vitb14", "weights": "weights/dinov2_vitb14_pretrain.pth"},
     "image": {"dinov2": "vitg14", "weights": "weights/dinov2_vitg14_pretrain.pth"},
     "first_stage": {"type": "vae", "path": "weights/sd-vae-ft-mse"}}
    Every file is checked before anything is built. A DINOv2 entry may set "depth" (tests); "weights":
    "random" and a first stage {"type": "vae", "path": None, "random": {AutoencoderKL config}} give random
    weights, for tests and the demo only. Random weights are drawn under the config's "seed" (default 0),
    so training and inference build the same encoders, and the caller's RNG is left untouched.
    """
    for name in ("pose", "image"):
        check_dinov2_weights(cfg[name]["dinov2"], cfg[name].get("weights"))
    if cfg["first_stage"]["type"] == "vae" and cfg["first_stage"].get("path") is not None:
        check_vae_dir(cfg["first_stage"]["path"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.get("seed", 0))
        pose, image = (DINOv2(cfg[n]["dinov2"], cfg[n]["weights"], cfg[n].get("depth"), cfg[n].get("size", DINOV2_SIZE))
                       for n in ("pose", "image"))
        first_stage = _build_first_stage(cfg["first_stage"])
    return Encoders(pose, image, first_stage).to(device)
