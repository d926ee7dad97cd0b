"""One way to load X-MDPT weights, from every file that holds them:

- a released state dict (.pt, e.g. `ema_0.9999_300000.pt`): recognised by its key names and renamed to ours;
  its config is read off the tensors' shapes (`config_from_state_dict`). Their `relative_position_index`
  buffers are checked against ours and dropped;
- our training checkpoint (.pt, train_xmdpt.py): its EMA weights (or the trained ones) and saved config;
- an export: a Hugging Face folder (config.json + model.safetensors, written by `XMDPT.save_pretrained` or
  `export`), or a .safetensors file whose config is in its metadata or in a config.json beside it.

`read_checkpoint` reads weights and config without building anything, so that a caller can check the file
against the config it expects (`check_fits`) before it builds the encoders; `load_checkpoint` builds the model
and loads it strictly.
"""
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from data.errors import InputError, MissingFileError
from data.files import atomic_path

from .tdnet import RelativePositionBias
from .xmdpt import TRAINING_ONLY, XMDPT, XMDPTConfig

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"  # the Hugging Face layout

_RELEASED_RENAMES = [
    (r"^(x_embedder|t_embedder|blocks|final_layer)\.", r"tdnet.\1."),
    (r"^(pos_embed|decoder_pos_embed)$", r"tdnet.\1"),
    (r"^mask_token$", "mipnet.mask_token"),
    (r"^sideblocks\.0\.", "mipnet.self_block."),
    (r"^sideblocks_cross\.0\.", "mipnet.cross_block."),
    (r"^mlp_dino_pose\.", "canet.pose.proj."),
    (r"^conv1d_pose\.", "canet.pose.pool."),
    (r"^mlp_dino_img\.", "canet.glob.proj."),
    (r"^conv1d_global\.", "canet.glob.pool."),
    (r"^conv1d_local\.", "canet.local.pool."),
    (r"^mlp_final\.", "canet.fuse."),
    (r"\.rel_pos_bias\.relative_position_bias_table$", ".rel_pos_bias.table"),
]


def is_released_state_dict(state_dict):
    """Whether a state dict has the released code's key names."""
    return "mlp_dino_pose.0.weight" in state_dict or "x_embedder.proj.weight" in state_dict


def convert_released_state_dict(state_dict):
    """Rename a released state dict to our keys; verify and drop the relative position index buffers."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("relative_position_index"):
            side = int(round(value.shape[0] ** 0.5))
            expected = RelativePositionBias(side, 1).index
            if value.shape != expected.shape or not torch.equal(value.long(), expected):
                raise InputError(f"released checkpoint: {key} is not the standard relative position index "
                                 f"for a {side}x{side} token map")
            continue
        for pattern, repl in _RELEASED_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def config_from_state_dict(state_dict):
    """The XMDPTConfig of a state dict in our key layout, read off its tensors' shapes. What shapes do not show
    keeps XMDPTConfig's default, that of every released model: decode_layer 2, mask_ratio 0.3, cond_drop 0.1,
    and eps prediction."""
    pos = state_dict["tdnet.pos_embed"]
    proj = state_dict["tdnet.x_embedder.proj.weight"]
    hidden, patch, in_ch = pos.shape[2], proj.shape[2], proj.shape[1]
    has = lambda prefix: any(k.startswith(prefix) for k in state_dict)
    mipnet = "-".join(n for n, p in (("self", "mipnet.self_block."), ("cross", "mipnet.cross_block."))
                      if has(p)) or "none"
    aggregation = "mlp" if has("canet.fuse.") else "add"
    if not has("canet.glob."):
        aggregation = "local"
    elif not has("canet.local."):
        aggregation = "global"
    widths = {"image_dim": state_dict["canet.glob.proj.0.weight"].shape[1]} if has("canet.glob.") else {}
    return XMDPTConfig(
        input_size=int(round(pos.shape[1] ** 0.5)) * patch, patch_size=patch, in_channels=in_ch,
        hidden_size=hidden, depth=1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("tdnet.blocks.")),
        num_heads=state_dict["tdnet.blocks.0.attn.rel_pos_bias.table"].shape[1],
        mlp_ratio=state_dict["tdnet.blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        learn_sigma=state_dict["tdnet.final_layer.linear.weight"].shape[0] == 2 * in_ch * patch * patch,
        pose_dim=state_dict["canet.pose.proj.0.weight"].shape[1],
        dino_tokens=state_dict["canet.pose.pool.0.weight"].shape[1], mipnet=mipnet, aggregation=aggregation,
        **widths)


@dataclass
class Checkpoint:
    """Weights in our key layout and the config they belong to; `contents` is the whole of one of our training
    checkpoints (optimizer, step, RNG states, run config), for resuming, and None for other files."""
    path: str
    weights: dict
    config: XMDPTConfig
    contents: dict | None = None


def _load_file(path):
    """A checkpoint file or folder as (tensors or checkpoint dict, config dict or None). A file that cannot be
    read to its end (cut short by an interrupted copy, or damaged) is an InputError that names it."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    try:
        if path.suffix != ".safetensors":
            return torch.load(path, map_location="cpu", weights_only=True), None
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # zipfile, pickle, torch and safetensors (Rust) each raise their own kind
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"checkpoint {path} is incomplete or corrupt ({first_line})") from e
    beside = path.with_name(CONFIG_NAME)
    text, source = (meta["config"], f"{path}'s metadata") if "config" in meta else \
        (beside.read_text(), str(beside)) if beside.is_file() else (None, None)
    try:
        return tensors, json.loads(text) if text is not None else None
    except json.JSONDecodeError as e:
        raise InputError(f"the config in {source} is incomplete or corrupt (not valid JSON: {e})") from None


def read_checkpoint(src, use_ema=True):
    """A `Checkpoint` of a path (any format above) or of an already loaded state dict. use_ema picks the EMA
    weights of our training checkpoints. Nothing is built."""
    name = str(src) if isinstance(src, (str, Path)) else "checkpoint"
    data, config = _load_file(src) if isinstance(src, (str, Path)) else (src, None)
    if not isinstance(data, dict):
        raise InputError(f"{name}: a checkpoint must be a dict, got {type(data).__name__}")
    if "model" in data and "model_config" in data:  # our training checkpoint
        weights = data["ema"] if use_ema else data["model"]
        return Checkpoint(name, dict(weights), XMDPTConfig(**data["model_config"]), data)
    weights = convert_released_state_dict(data) if is_released_state_dict(data) else dict(data)
    if not config:
        return Checkpoint(name, weights, config_from_state_dict(weights))
    try:
        return Checkpoint(name, weights, XMDPTConfig(**config))
    except (TypeError, ValueError) as e:
        raise InputError(f"{name}: its config is not an X-MDPT config ({e})") from None


def check_fits(config, expected, source, wanted="the config"):
    """ValueError listing every field in which a checkpoint's config differs from the expected one, but for
    those that only change training (a checkpoint exported without MIPNet fits a config with it)."""
    diffs = [f"{k}: {config[k]} in the checkpoint, {expected[k]} in {wanted}" for k in config
             if k not in TRAINING_ONLY and config[k] != expected[k]]
    if diffs:
        raise InputError(f"{source} does not fit {wanted}:\n  " + "\n  ".join(diffs))


def strict_load(model, state_dict, source="checkpoint"):
    """load_state_dict that first lists every missing, unexpected and mis-shaped key in one error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match the model architecture {dict(model.config)}"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", shapes)):
            if items:
                lines.append(f"{title} ({len(items)}): " + "; ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise InputError("\n".join(lines))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()})
    return model


def load_checkpoint(src, model=None, config=None, use_ema=True):
    """Load weights into `model` (or a new XMDPT built from `config`, else from the checkpoint's own config)
    strictly; returns the model in eval mode. src: a path (any format above) or a loaded state dict."""
    ckpt = read_checkpoint(src, use_ema)
    model = model if model is not None else XMDPT(config or ckpt.config)
    strict_load(model, ckpt.weights, ckpt.path)
    return model.eval()


def export(model, path, inference_only=True, dtype=torch.float32):
    """Write `model`'s weights in the Hugging Face layout (config.json + model.safetensors) to the folder `path`,
    atomically, as `dtype`. inference_only drops MIPNet, which only trains, and records mipnet='none'."""
    config = replace(model.config, mipnet="none") if inference_only else model.config
    with torch.device("meta"):
        out = XMDPT(config)  # no memory, no random numbers: the weights are assigned below
    weights = {k: v.detach().to(dtype) for k, v in model.state_dict().items() if k in out.state_dict()}
    out.load_state_dict(weights, assign=True)
    with atomic_path(path, durable=True) as staged:
        out.save_pretrained(staged)
    return Path(path)
