"""Loading X-MDPT weights: released state dicts, our training checkpoints and safetensors exports.

Released files (e.g. `ema_0.9999_300000.pt`) are plain state dicts in the original key layout; they are
recognised by their key names, renamed to ours, and loaded strictly. Their `relative_position_index`
buffers are checked against ours and dropped. The architecture is read from the tensors' shapes unless
given (the released files do not record `decode_layer`, which is 2 for every released model).
"""
import json
import os
import re
from pathlib import Path

import torch

from .xmdpt import XMDPT

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
    return "mlp_dino_pose.0.weight" in state_dict or "x_embedder.proj.weight" in state_dict


def convert_released_state_dict(state_dict):
    """Rename a released state dict to our keys; verify and drop the relative position index buffers."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("relative_position_index"):
            grid = int(round(value.shape[0] ** 0.5))
            expected = _relative_position_index(grid)
            if value.shape != expected.shape or not torch.equal(value.long(), expected):
                raise ValueError(f"released checkpoint: {key} is not the standard relative position index "
                                 f"for a {grid}x{grid} grid")
            continue
        for pattern, repl in _RELEASED_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _relative_position_index(grid):
    from .tdnet import RelativePositionBias
    return RelativePositionBias(grid, 1).index


def infer_arch(state_dict):
    """XMDPT kwargs read off the shapes of a state dict in our key layout (and prediction='eps', which
    shapes do not show: the released models predict eps)."""
    pos = state_dict["tdnet.pos_embed"]
    proj = state_dict["tdnet.x_embedder.proj.weight"]
    hidden, patch, in_ch = pos.shape[2], proj.shape[2], proj.shape[1]
    grid = int(round(pos.shape[1] ** 0.5))
    depth = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("tdnet.blocks."))
    has = lambda prefix: any(k.startswith(prefix) for k in state_dict)
    mipnet = "-".join(n for n, p in (("self", "mipnet.self_block."), ("cross", "mipnet.cross_block."))
                      if has(p)) or "none"
    aggregation = "mlp" if has("canet.fuse.") else "add"
    if not has("canet.glob."):
        aggregation = "local"
    elif not has("canet.local."):
        aggregation = "global"
    arch = dict(input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden, depth=depth,
                num_heads=state_dict["tdnet.blocks.0.attn.rel_pos_bias.table"].shape[1],
                mlp_ratio=state_dict["tdnet.blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                learn_sigma=state_dict["tdnet.final_layer.linear.weight"].shape[0] == 2 * in_ch * patch * patch,
                pose_dim=state_dict["canet.pose.proj.0.weight"].shape[1],
                dino_tokens=state_dict["canet.pose.pool.0.weight"].shape[1],
                mipnet=mipnet, aggregation=aggregation, prediction="eps")
    if has("canet.glob."):
        arch["image_dim"] = state_dict["canet.glob.proj.0.weight"].shape[1]
    return arch


def _read(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return {"model": load_file(str(path)), "arch": json.loads(meta["arch"]) if "arch" in meta else None}
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e


def extract_state_dict(ckpt, use_ema=True):
    """(state dict in our keys, arch or None) from any supported checkpoint object."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"a checkpoint must be a dict, got {type(ckpt).__name__}")
    if "model" in ckpt and isinstance(ckpt["model"], dict):
        state = ckpt["ema"] if use_ema and isinstance(ckpt.get("ema"), dict) else ckpt["model"]
        arch = ckpt.get("arch") or (ckpt.get("config") or {}).get("arch")
        return dict(state), arch
    if is_released_state_dict(ckpt):
        return convert_released_state_dict(ckpt), None
    return dict(ckpt), None


def strict_load(model, state_dict, source="checkpoint"):
    """load_state_dict that first lists every missing, unexpected and mis-shaped key in one error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match the model architecture {getattr(model, 'arch', '')}"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", shapes)):
            if items:
                lines.append(f"{title} ({len(items)}): " + "; ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise ValueError("\n".join(lines))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()})
    return model


def read_checkpoint(src, use_ema=True):
    """(state dict in our keys, arch, whether the arch was saved in the file) of a path or loaded dict;
    an arch not saved (released files) is read off the tensors' shapes."""
    ckpt = _read(src) if isinstance(src, (str, os.PathLike)) else src
    state_dict, saved_arch = extract_state_dict(ckpt, use_ema)
    return state_dict, saved_arch or infer_arch(state_dict), saved_arch is not None


def load_checkpoint(src, model=None, arch=None, use_ema=True):
    """Load weights into `model` (or a new XMDPT built from `arch`, the checkpoint's own arch, or the
    shapes of its tensors) strictly; returns the model in eval mode.

    src: a path (.pt/.pth released state dict or our training checkpoint, .safetensors export) or an
    already loaded dict. use_ema picks the EMA weights of our training checkpoints.
    """
    name = str(src) if isinstance(src, (str, os.PathLike)) else "checkpoint"
    state_dict, own_arch, _ = read_checkpoint(src, use_ema)
    model = model if model is not None else XMDPT(**(arch or own_arch))
    strict_load(model, state_dict, name)
    return model.eval()


def save_safetensors(model, path, inference_only=False, dtype=torch.float32):
    """Export weights with the architecture in the file's metadata, written atomically. inference_only
    drops MIPNet (training only), recording mipnet='none' in the architecture."""
    from safetensors.torch import save_file
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    arch = dict(model.arch, mipnet="none") if inference_only else model.arch
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()
               if not (inference_only and k.startswith("mipnet."))}
    save_file(tensors, str(tmp), metadata={"arch": json.dumps(arch)})
    os.replace(tmp, path)
