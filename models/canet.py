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

    def initialize_weights(self):
        if self.proj is not None:
            nn.init.normal_(self.proj[0].weight, std=0.02)
        nn.init.normal_(self.pool[0].weight, std=0.02)

    def forward(self, tokens):
        if self.proj is not None:
            tokens = self.proj(tokens)  # (N, T, D)
        return self.pool(tokens).squeeze(1)  # (N, D)


class CANet(nn.Module):
    """aggregation: 'mlp' (paper default) y = MLP(pose + global + local); 'add' y = pose + global + local;
    'local' y = MLP(pose + local); 'global' y = MLP(pose + global)."""

    def __init__(self, dim, pose_dim, image_dim, num_patches, dino_tokens=257, aggregation="mlp"):
        super().__init__()
        self.aggregation = aggregation
        self.pose = TokenHead(pose_dim, dim, dino_tokens)
        self.glob = TokenHead(image_dim, dim, dino_tokens) if aggregation != "local" else None
        self.local = TokenHead(None, dim, num_patches) if aggregation != "global" else None
        self.fuse = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=1e-12)) \
            if aggregation != "add" else None

    def initialize_weights(self):
        """Every head's projection and pooling, and the fusing MLP, N(0, 0.02)."""
        for head in (self.pose, self.glob, self.local):
            if head is not None:
                head.initialize_weights()
        if self.fuse is not None:
            nn.init.normal_(self.fuse[0].weight, std=0.02)

    def heads(self, pose, image, source_tokens):
        """Each head's vector (N, D) by name: pose (N, 257, pose_dim) DINOv2 tokens of the skeleton, global
        (N, 257, image_dim) of the source image, local (N, L, D) the embedded source latent."""
        out = {"pose": self.pose(pose)}
        if self.glob is not None:
            out["global"] = self.glob(image)
        if self.local is not None:
            out["local"] = self.local(source_tokens)
        return out

    def forward(self, pose, image, source_tokens):
        """-> the unified condition y (N, D)."""
        y = sum(self.heads(pose, image, source_tokens).values())
        return self.fuse(y) if self.fuse is not None else y
