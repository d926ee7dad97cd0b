"""YAML configs with `key=value` overrides (dotted keys, values parsed as YAML).

A config may start from another: `base: xmdpt_s.yaml` (relative to the file) is read first and the file's
own sections are merged over it, key by key.

The `model:` section is an XMDPTConfig: `preset` names one of XMDPT_CONFIGS, and every other key is one of
its fields. The fields that follow from other sections are derived, and a model section that states them
otherwise is refused: the DINOv2 widths (pose_dim, image_dim) and token count (dino_tokens, from the input `size`,
224 unless an encoder says otherwise) from `encoders:`, and the latent grid (input_size, in_channels) from
`data.size` through the first stage.
"""
import copy
import re
from dataclasses import replace
from pathlib import Path

import yaml

from data.errors import InputError, MissingFileError

CONFIG_DIR = Path(__file__).resolve().parent

# The sections and keys every config has.
SCHEMA = {
    "model": {"preset"},
    "encoders": {"pose", "image", "first_stage"},
    "data": {"root", "size", "scale_jitter", "cache", "workers"},
    "train": {"global_batch", "lr", "weight_decay", "ema", "grad_accum", "grad_clip", "max_steps",
              "ckpt_every", "keep_last", "keep_every", "log_every", "sample_every", "seed", "mixed_precision",
              "compile"},
    "sample": {"steps", "cfg_scale", "scale_pow", "clip_denoised", "num_pairs"},
}
# A `distill` section makes a training run distil its teacher into a few-step student, by its `method`:
# consistency distillation (the default) or distribution matching (dmd2), each with keys of its own.
DISTILL = {"consistency": {"loss", "huber_c", "weighting"},
           "dmd2": {"student", "ratio", "fake_lr", "gan_weight", "head_weight"}}
DISTILL_KEYS = {"teacher", "cfg_scale", "scale_pow"}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` (no dot) as a string; here it is the float a user means."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _parse_override(item):
    if "=" not in item:
        raise InputError(f"override {item!r} must look like section.key=value")
    key, value = item.split("=", 1)
    try:
        return key.strip().split("."), yaml.load(value, _Loader)
    except yaml.YAMLError as e:
        raise InputError(f"override {item!r}: the value is not valid YAML ({e})") from None


def _merge(base, over):
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml(path):
    """A config file with its `base` chain resolved."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"config not found: {path}")
    try:
        with open(path) as f:
            cfg = yaml.load(f, _Loader) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path} must hold sections (a YAML mapping), got {type(cfg).__name__}")
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
                raise InputError(f"override {item!r}: {'.'.join(keys[:-1])} is not a section of {path}")
            node = node[k]
        if keys[0] != "model" and keys[-1] not in node and len(keys) == 2:
            raise InputError(f"override {item!r}: unknown key {keys[-1]!r} in section {keys[0]!r}")
        node[keys[-1]] = value
    check_config(cfg, path)
    return cfg


def distill_method(cfg):
    """The distillation method of a config with a `distill` section: its `method`, consistency by default."""
    return cfg["distill"].get("method", "consistency")


def check_config(cfg, source="config"):
    """Every section and key of SCHEMA is there (and of a `distill` section, its method's), and the model section
    makes a valid XMDPTConfig: a consistency model exactly when the config distils one, and without MIPNet."""
    sections = list(SCHEMA.items())
    if "distill" in cfg:
        if not isinstance(cfg["distill"], dict) or distill_method(cfg) not in DISTILL:
            method = cfg["distill"].get("method") if isinstance(cfg["distill"], dict) else cfg["distill"]
            raise InputError(f"{source}: distill.method must be one of {', '.join(DISTILL)}, got {method!r}")
        sections.append(("distill", DISTILL_KEYS | DISTILL[distill_method(cfg)]))
    for section, keys in sections:
        if not isinstance(cfg.get(section), dict):
            raise InputError(f"{source}: missing section {section!r}")
        given = set(cfg[section]) - {"method"} if section == "distill" else set(cfg[section])
        missing, unknown = sorted(keys - given), sorted(given - keys)
        if missing:
            raise InputError(f"{source}: missing keys in section {section!r}: {', '.join(missing)}")
        if unknown and section == "distill":
            raise InputError(f"{source}: unknown keys in section 'distill' for method {distill_method(cfg)}: "
                             f"{', '.join(unknown)}")
    try:
        config = model_config(cfg)
    except (ValueError, TypeError) as e:
        raise InputError(f"{source}: {e}") from None
    if "distill" in cfg and not (config.consistency and config.mipnet == "none"):
        raise InputError(f"{source}: a config that distils (a distill section) trains a consistency model without "
                         f"MIPNet: set model.consistency: true and model.mipnet: none")
    if config.consistency and "distill" not in cfg:
        raise InputError(f"{source}: model.consistency: true needs a distill section: a consistency model is "
                         f"distilled from a diffusion model (configs/distill_demo.yaml)")
    if "distill" in cfg and distill_method(cfg) == "consistency":
        from models.consistency import LOSSES, WEIGHTINGS
        for key, allowed in (("loss", LOSSES), ("weighting", WEIGHTINGS)):
            if cfg["distill"][key] not in allowed:
                raise InputError(f"{source}: distill.{key} must be one of {', '.join(allowed)}, got "
                                 f"{cfg['distill'][key]!r}")


def model_config(cfg):
    """The XMDPTConfig of a config: its preset, with the model section's fields and the fields derived from the
    encoders and the image size. Nothing is built, so a checkpoint can be checked against it before any encoder
    is."""
    from models import XMDPT_CONFIGS, XMDPTConfig
    from models.encoders import DINOV2_SIZE, dinov2_tokens, dinov2_width, first_stage_geometry
    fields = dict(cfg["model"])
    preset = fields.pop("preset")
    if preset not in XMDPT_CONFIGS:
        raise InputError(f"model.preset {preset!r} is not one of {sorted(XMDPT_CONFIGS)}")
    unknown = sorted(set(fields) - set(XMDPTConfig.__dataclass_fields__))
    if unknown:
        raise InputError(f"unknown model keys {unknown}; expected 'preset' or fields of XMDPTConfig: "
                         f"{', '.join(XMDPTConfig.__dataclass_fields__)}")
    size, first_stage = cfg["data"]["size"], cfg["encoders"]["first_stage"]
    downsample, channels = first_stage_geometry(first_stage)
    if size % downsample:
        raise InputError(f"data.size {size} is not a multiple of {downsample}, the downsampling of "
                         f"encoders.first_stage ({first_stage['type']})")
    stage = (f"data.size {size} through encoders.first_stage ({first_stage['type']}: {downsample}x down, "
             f"{channels} channels)")
    pose, image = cfg["encoders"]["pose"]["dinov2"], cfg["encoders"]["image"]["dinov2"]
    sizes = {name: cfg["encoders"][name].get("size", DINOV2_SIZE) for name in ("pose", "image")}
    if dinov2_tokens(sizes["pose"]) != dinov2_tokens(sizes["image"]):
        raise InputError(f"encoders.pose.size {sizes['pose']} and encoders.image.size {sizes['image']} must give "
                         f"DINOv2 the same number of tokens: CANet reads both with one layout")
    derived = {"pose_dim": (dinov2_width(pose), f"encoders.pose.dinov2 {pose}"),
               "image_dim": (dinov2_width(image), f"encoders.image.dinov2 {image}"),
               "dino_tokens": (dinov2_tokens(sizes["pose"]), f"encoders.pose.size {sizes['pose']}"),
               "input_size": (size // downsample, stage), "in_channels": (channels, stage)}
    for field, (value, source) in derived.items():
        if fields.setdefault(field, value) != value:
            raise InputError(f"model.{field} {fields[field]} does not match {source}, which gives {value}; leave "
                             f"model.{field} out")
    return replace(XMDPT_CONFIGS[preset], **fields)
