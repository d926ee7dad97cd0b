"""MIPNet: masked interpolation with cross-view prediction (training only).

During the masked forward, TDNet's encoder sees only the kept tokens of the noisy target. MIPNet's side
interpolater then restores the full sequence: a learned mask token fills the dropped places, the decoder
position embedding is added, and AdaLN-modulated attention blocks predict the dropped tokens: a
self-attention block and a cross-attention block whose keys/values are the source tokens after the same
encoder blocks (computed without gradient). Kept places keep their value (masked shortcut).
At inference nothing here runs.
"""
import torch
import torch.nn as nn

from .tdnet import Block

ATTENTIONS = ("none", "self", "cross", "cross-self", "self-cross")


class MIPNet(nn.Module):
    """attention: 'self-cross' (paper default), 'cross-self', 'cross', or 'self' (MDT's side interpolater)."""

    def __init__(self, dim, num_heads, side, mlp_ratio=4.0, mask_ratio=0.3, attention="self-cross"):
        super().__init__()
        self.mask_ratio = float(mask_ratio)
        self.order = tuple(attention.split("-"))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.self_block = Block(dim, num_heads, side, mlp_ratio) if "self" in self.order else None
        self.cross_block = Block(dim, num_heads, side, mlp_ratio, cross=True) if "cross" in self.order else None

    def initialize_weights(self):
        for block in (self.self_block, self.cross_block):
            if block is not None:
                block.initialize_weights()

    @property
    def needs_context(self):
        """Whether a cross-attention block runs, which attends to the source tokens."""
        return self.cross_block is not None

    def mask(self, tokens, noise=None):
        """Keep the int(L * (1 - ratio)) tokens with the smallest noise. Returns (kept tokens, their ids)."""
        n, length, dim = tokens.shape
        if noise is None:
            noise = torch.rand(n, length, device=tokens.device)  # (N, L)
        ids_keep = noise.argsort(dim=1)[:, :int(length * (1 - self.mask_ratio))]  # (N, K)
        return tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, dim)), ids_keep  # (N, K, D), (N, K)

    def forward(self, kept, c, ids_keep, pos_embed, context=None):
        """The encoder's kept tokens (N, K, D) at places ids_keep (N, K), condition c (N, D), the decoder
        position embedding (1, L, D), the source context (N, L, D) -> the restored sequence (N, L, D)."""
        n, length, dim = kept.shape[0], pos_embed.shape[1], kept.shape[2]
        index = ids_keep.unsqueeze(-1).expand(-1, -1, dim)  # (N, K, D): where each kept token goes
        # (1, 1, D) mask token at every place, the kept tokens scattered back into theirs, plus position: (N, L, D)
        before = self.mask_token.expand(n, length, dim).scatter(1, index, kept) + pos_embed
        x = before
        for name in self.order:  # self-attention over the L places; cross-attention to the source's L tokens
            x = self.self_block(x, c) if name == "self" else self.cross_block(x, c, context=context)
        dropped = torch.ones(n, length, 1, dtype=torch.bool, device=kept.device).scatter(
            1, ids_keep.unsqueeze(-1), False)  # (N, L, 1): True where the encoder saw no token
        return torch.where(dropped, x, before)  # (N, L, D): predicted where dropped, kept values elsewhere
