"""YAML configs with `key=value` overrides (dotted keys, values parsed as YAML).

A config may start from another: `base: xmdpt_s.yaml` (relative to the file) is read first and the file's
own sections are merged over it, key by key.

The `model:` section is an XMDPTConfig: `preset` names one of XMDPT_CONFIGS, and every other key is one of
its fields. The DINOv2 widths (pose_dim, image_dim) follow from the `encoders:` section.
"""
import copy
import re
from dataclasses import replace
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent

# The sections and keys every config has.
SCHEMA = {
    "model": {"preset"},
    "encoders": {"pose", "image", "first_stage"},
    "data": {"root", "size", "scale_jitter", "cache", "workers"},
    "train": {"global_batch", "lr", "weight_decay", "ema", "grad_accum", "grad_clip", "max_steps",
              "ckpt_every", "log_every", "sample_every", "seed", "mixed_precision"},
    "sample": {"steps", "cfg_scale", "scale_pow", "clip_denoised", "num_pairs"},
}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` (no dot) as a string; here it is the float a user means."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _parse_override(item):
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value")
    key, value = item.split("=", 1)
    return key.strip().split("."), yaml.load(value, _Loader)


def _merge(base, over):
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml(path):
    """A config file with its `base` chain resolved."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    with open(path) as f:
        cfg = yaml.load(f, _Loader) or {}
    if "base" in cfg:
        cfg = _merge(read_yaml(path.parent / cfg.pop("base")), cfg)
    return cfg


def load_config(path, overrides=()):
    """Read a config, apply `section.key=value` overrides, check it against SCHEMA; returns a dict."""
    cfg = read_yaml(path)
    for item in overrides:
        keys, value = _parse_override(item)
        node = cfg
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                raise ValueError(f"override {item!r}: {'.'.join(keys[:-1])} is not a section of {path}")
            node = node[k]
        if keys[0] != "model" and keys[-1] not in node and len(keys) == 2:
            raise ValueError(f"override {item!r}: unknown key {keys[-1]!r} in section {keys[0]!r}")
        node[keys[-1]] = value
    check_config(cfg, path)
    return cfg


def check_config(cfg, source="config"):
    """Every section and key of SCHEMA is there, and the model section makes a valid XMDPTConfig."""
    for section, keys in SCHEMA.items():
        if not isinstance(cfg.get(section), dict):
            raise ValueError(f"{source}: missing section {section!r}")
        missing = sorted(keys - set(cfg[section]))
        if missing:
            raise ValueError(f"{source}: missing keys in section {section!r}: {', '.join(missing)}")
    try:
        model_config(cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {e}") from None


def model_config(cfg):
    """The XMDPTConfig of a config: its preset, with the model section's fields and the encoders' DINOv2 widths.
    Nothing is built, so a checkpoint can be checked against it before any encoder is."""
    from models import XMDPT_CONFIGS, XMDPTConfig
    from models.encoders import dinov2_width
    fields = dict(cfg["model"])
    preset = fields.pop("preset")
    if preset not in XMDPT_CONFIGS:
        raise ValueError(f"model.preset {preset!r} is not one of {sorted(XMDPT_CONFIGS)}")
    unknown = sorted(set(fields) - set(XMDPTConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown model keys {unknown}; expected 'preset' or fields of XMDPTConfig: "
                         f"{', '.join(XMDPTConfig.__dataclass_fields__)}")
    for field, encoder in (("pose_dim", "pose"), ("image_dim", "image")):
        variant = cfg["encoders"][encoder]["dinov2"]
        width = dinov2_width(variant)
        if fields.setdefault(field, width) != width:
            raise ValueError(f"model.{field} {fields[field]} does not match encoders.{encoder}.dinov2 {variant} "
                             f"(width {width})")
    return replace(XMDPT_CONFIGS[preset], **fields)
