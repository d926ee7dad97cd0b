"""CANet: the conditional aggregation network that builds the unified condition vector y.

Three heads squeeze token sequences into one width-D vector each:
- pose: DINOv2-B tokens of the rendered target skeleton,
- global: DINOv2-G tokens of the source image,
- local: the source latent, embedded by TDNet's patch and position embedding.
Their sum goes through an MLP (Linear -> GELU -> LayerNorm) to give y; the denoiser is conditioned on
c = t_emb + y.
"""
import torch.nn as nn

AGGREGATIONS = ("local", "global", "add", "mlp")


class TokenHead(nn.Module):
    """(N, T, in_dim) tokens -> (N, D): optional Linear -> GELU -> LayerNorm per token, then a learned
    weighted sum over the T tokens (a width-1 Conv1d with T input channels) -> GELU -> LayerNorm."""

    def __init__(self, in_dim, dim, num_tokens):
        super().__init__()
        self.in_dim, self.num_tokens = in_dim, num_tokens
        self.proj = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=1e-12)) if in_dim else None
        self.pool = nn.Sequential(nn.Conv1d(num_tokens, 1, kernel_size=1), nn.GELU(), nn.LayerNorm(dim, eps=1e-12))

    def forward(self, tokens):
        if self.proj is not None:
            tokens = self.proj(tokens)
        return self.pool(tokens).squeeze(1)


class CANet(nn.Module):
    """aggregation: 'mlp' (paper default) y = MLP(pose + global + local); 'add' y = pose + global + local;
    'local' y = MLP(pose + local); 'global' y = MLP(pose + global)."""

    def __init__(self, dim, pose_dim, image_dim, num_patches, dino_tokens=257, aggregation="mlp"):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.aggregation = aggregation
        self.pose = TokenHead(pose_dim, dim, dino_tokens)
        self.glob = TokenHead(image_dim, dim, dino_tokens) if aggregation != "local" else None
        self.local = TokenHead(None, dim, num_patches) if aggregation != "global" else None
        self.fuse = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=1e-12)) \
            if aggregation != "add" else None

    def forward(self, pose, image, source_tokens):
        y = self.pose(pose)
        if self.glob is not None:
            y = y + self.glob(image)
        if self.local is not None:
            y = y + self.local(source_tokens)
        return self.fuse(y) if self.fuse is not None else y
