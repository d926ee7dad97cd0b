"""YAML configs with `key=value` overrides (dotted keys, values parsed as YAML).

A config may start from another: `base: xmdpt_s.yaml` (relative to the file) is read first and the file's
own sections are merged over it, key by key.
"""
import copy
import inspect
import re
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent

# The sections and keys every config has; model keys are XMDPT arguments (checked against its signature).
SCHEMA = {
    "model": {"arch"},
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


def _model_keys():
    from models import XMDPT
    return {"arch"} | set(inspect.signature(XMDPT.__init__).parameters) - {"self"}


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
    for section, keys in SCHEMA.items():
        if not isinstance(cfg.get(section), dict):
            raise ValueError(f"{source}: missing section {section!r}")
        missing = sorted(keys - set(cfg[section]))
        if missing:
            raise ValueError(f"{source}: missing keys in section {section!r}: {', '.join(missing)}")
    unknown = sorted(set(cfg["model"]) - _model_keys())
    if unknown:
        raise ValueError(f"{source}: unknown model keys {unknown}; expected XMDPT arguments or 'arch'")


def model_arch(cfg, pose_dim, image_dim):
    """All XMDPT kwargs: its defaults, the named size from XMDPT_CONFIGS, the encoders' widths, the config's
    overrides."""
    from models import XMDPT, XMDPT_CONFIGS
    name = cfg["model"]["arch"]
    if name not in XMDPT_CONFIGS:
        raise ValueError(f"model.arch {name!r} is not one of {sorted(XMDPT_CONFIGS)}")
    defaults = {k: p.default for k, p in inspect.signature(XMDPT.__init__).parameters.items() if k != "self"}
    arch = dict(defaults, **XMDPT_CONFIGS[name], pose_dim=pose_dim, image_dim=image_dim)
    arch.update({k: v for k, v in cfg["model"].items() if k != "arch"})
    return arch
