"""What one training step computes: the model's inputs from a batch's features, X-MDPT's loss, and the EMA.

The loss of a step is the hybrid loss (MSE + VLB, learned sigma) of an unmasked forward plus, with MIPNet, that
of a masked forward on the same x_t, t and noise. Its terms are named by forward: `plain_*` and `masked_*`
(`loss`, `mse`, `vb`, means over the batch), and `total` is what is back-propagated.
"""
import torch
import torch.nn as nn


def step_inputs(features, first_stage):
    """(x0, pose tokens, image tokens, source latent) from a batch's features (`Encoders.features` or a feature
    cache): a fresh latent of the target, then of the source, is sampled from their posterior moments."""
    x0 = first_stage.sample_from_moments(features["target_mean"], features["target_logvar"])
    source = first_stage.sample_from_moments(features["source_mean"], features["source_logvar"])
    return x0, features["pose"], features["image"], source


class Objective(nn.Module):
    """The loss of one step, as one module, so that DistributedDataParallel sees one forward per backward."""

    def __init__(self, model, diffusion):
        super().__init__()
        self.model, self.diffusion = model, diffusion

    def forward(self, x0, pose, image, source):
        """x0 (N, C, H, W) target latents, the DINOv2 tokens and the source latent -> dict of scalar terms."""
        t = self.diffusion.sample_timesteps(x0.shape[0], x0.device)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype)
        cond = dict(pose=pose, image=image, source=source)
        plain = self.diffusion.training_losses(self.model, x0, t, cond, noise)
        terms = {f"plain_{k}": v.mean() for k, v in plain.items()}
        terms["total"] = terms["plain_loss"]
        if self.model.mipnet is not None:
            masked = self.diffusion.training_losses(self.model, x0, t, dict(cond, mask=True), noise)
            terms.update({f"masked_{k}": v.mean() for k, v in masked.items()})
            terms["total"] = terms["plain_loss"] + terms["masked_loss"]
        return terms


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
