"""X-MDPT's training objective: what one step computes from a batch's model inputs.

An objective is a module: objective(x0, cond) -> a dict of scalar loss terms, `total` among them, which is what
the step back-propagates; its `terms` name them all, in the order they are logged. The training loop knows
nothing else of it, so another objective plugs into the same loop: `build_objective` gives X-MDPT's loss, or
consistency distillation (models/consistency.py) when the config has a `distill` section.

X-MDPT's loss is the hybrid loss (MSE + VLB, learned sigma) of an unmasked forward plus, with MIPNet, that of a
masked forward on the same x_t, t and noise. Its terms are named by forward, `plain_*` and `masked_*` (`loss`,
`mse`, `vb`, means over the batch).
"""
from dataclasses import replace

import torch
import torch.nn as nn

from data.errors import InputError

from .checkpoint import check_fits, read_checkpoint, strict_load
from .consistency import ConsistencyDistillation
from .diffusion import Diffusion
from .xmdpt import XMDPT


class XMDPTLoss(nn.Module):
    """The loss of one step, as one module, so that DistributedDataParallel sees one forward per backward."""

    def __init__(self, model, diffusion):
        super().__init__()
        self.model, self.diffusion = model, diffusion
        forwards = ("plain", "masked") if model.mipnet is not None else ("plain",)
        self.terms = ("total", *(f"{f}_{k}" for f in forwards for k in ("loss", "mse", "vb")))

    def forward(self, x0, cond):
        """x0 (N, C, H, W) target latents; cond: the model's condition (`pose`, `image` DINOv2 tokens and the
        `source` latent) -> dict of scalar terms."""
        t = self.diffusion.sample_timesteps(x0.shape[0], x0.device)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype)
        plain = self.diffusion.training_losses(self.model, x0, t, cond, noise)
        terms = {f"plain_{k}": v.mean() for k, v in plain.items()}
        terms["total"] = terms["plain_loss"]
        if self.model.mipnet is not None:
            masked = self.diffusion.training_losses(self.model, x0, t, dict(cond, mask=True), noise)
            terms.update({f"masked_{k}": v.mean() for k, v in masked.items()})
            terms["total"] = terms["plain_loss"] + terms["masked_loss"]
        return terms


def build_objective(cfg, model, ema):
    """The objective of a training config for `model` and its EMA: X-MDPT's loss, or with a `distill` section,
    the consistency distillation of `distill.teacher` (any checkpoint the loader reads) into the model, which
    then starts, with its EMA, from the teacher's weights."""
    distill = cfg.get("distill")
    if distill is None:
        return XMDPTLoss(model, Diffusion())
    source = f"distill.teacher {distill['teacher']}"
    ckpt = read_checkpoint(distill["teacher"])
    if ckpt.config.consistency:
        raise InputError(f"{source} is a consistency model already; distil the diffusion model it came from")
    check_fits(ckpt.config, replace(model.config, consistency=False), source, "the student (the model section)")
    sampling = {k: v for k, v in ckpt.weights.items() if not k.startswith("mipnet.")}  # it samples: MIPNet only trains
    teacher = strict_load(XMDPT(replace(ckpt.config, mipnet="none")), sampling, source)
    teacher.to(next(model.parameters()).device)
    return ConsistencyDistillation(model, ema, teacher, Diffusion(), distill["cfg_scale"], distill["scale_pow"],
                                  distill["loss"], distill["huber_c"], distill["weighting"],
                                  cfg["sample"]["clip_denoised"])
