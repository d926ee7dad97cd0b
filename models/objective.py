"""X-MDPT's training objective: what one step computes from a batch's model inputs.

An objective is a module: objective(x0, cond) -> a dict of scalar loss terms, `total` among them, which is what
the step back-propagates; its `terms` name them all, in the order they are logged. The training loop knows
nothing else of it, so another objective (a distillation, an ablation's loss) plugs into the same loop.

X-MDPT's loss is the hybrid loss (MSE + VLB, learned sigma) of an unmasked forward plus, with MIPNet, that of a
masked forward on the same x_t, t and noise. Its terms are named by forward, `plain_*` and `masked_*` (`loss`,
`mse`, `vb`, means over the batch).
"""
import torch
import torch.nn as nn


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
