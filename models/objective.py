"""What one training step computes from a batch's model inputs: an `Objective`, and X-MDPT's own loss.

An objective is a module: objective(x0, cond) -> a dict of scalar loss terms, `total` among them, which is what
the step back-propagates; its `terms` name them all, in the order they are logged. The training loop knows
nothing else of it, so every objective runs in the same loop: X-MDPT's loss here, consistency distillation
(models/consistency.py) and distribution matching distillation (models/dmd2.py); training/recipes.py picks one
from the config. An objective that trains networks of its own (a distillation's fake score) steps their optimizer
in `update`, after the loop's step, and keeps what a resumed run needs of them in `run_state`.

X-MDPT's loss is the hybrid loss (MSE + VLB, learned sigma) of an unmasked forward plus, with MIPNet, that of a
masked forward on the same x_t, t and noise. Its terms are named by forward, `plain_*` and `masked_*` (`loss`,
`mse`, `vb`, means over the batch).
"""
import torch
import torch.nn as nn


class Objective(nn.Module):
    """The interface the training loop sees. `alternating`: some of its parameters get no gradient at some steps
    (a distillation that updates its student every few steps), which DistributedDataParallel must be told."""

    terms = ("total",)
    alternating = False

    def update(self):
        """After the loop's optimizer step: step the objective's own networks, if it has any (none here)."""

    def run_state(self):
        """What a checkpoint keeps of the objective itself, for an exact resume (nothing here)."""
        return {}

    def load_run_state(self, state):
        """Take up what `run_state` returned (nothing to take up here)."""


class XMDPTLoss(Objective):
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
