"""TDNet: the transformer denoising network of X-MDPT.

A DiT backbone on latent patches: AdaLN-Zero blocks whose attention carries a learned, BEiT-style relative
position bias, a sin-cos initialised absolute position embedding, and a second ("decoder") position
embedding added before the last `decode_layer` blocks. Attention runs through
`scaled_dot_product_attention` with the bias as an additive mask.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sincos_pos_embed(dim, side):
    """2-D sin-cos position embedding (side*side, dim) of a side x side token map: the first half encodes the
    column, the second the row."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64),
                                torch.arange(side, dtype=torch.float64), indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def modulate(x, shift, scale):
    """AdaLN: tokens x (N, L, D) scaled by 1 + scale and shifted by shift, both (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """(N, C, H, W) latents -> (N, H*W/p^2, D) tokens through a strided convolution."""

    def __init__(self, input_size, patch_size, in_channels, dim):
        super().__init__()
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.side = input_size // patch_size  # tokens per side of the latent's token map
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, side, side) -> (N, side*side, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the timestep (cos then sin, 256 of them) through a two-layer MLP."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))


class RelativePositionBias(nn.Module):
    """Learned bias per head for every (query, key) offset on a side x side token map (L = side^2 tokens).

    The table has (2 side - 1)^2 + 3 rows, one per offset (dy, dx) in [-(side-1), side-1]^2, as in BEiT (the last
    three rows are unused here). Without gradient the (heads, L, L) bias is computed once and reused until the
    table changes.
    """

    def __init__(self, side, num_heads):
        super().__init__()
        self.table = nn.Parameter(torch.zeros((2 * side - 1) ** 2 + 3, num_heads))  # (offsets + 3, heads)
        nn.init.trunc_normal_(self.table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")).flatten(1)  # (2, L)
        offset = coords[:, :, None] - coords[:, None, :] + side - 1  # (2, L, L): query minus key, shifted to >= 0
        # (L, L): the table row of each (query, key) pair, the offset (dy, dx) read as one index, row-major
        self.register_buffer("index", offset[0] * (2 * side - 1) + offset[1], persistent=False)
        self._cache = None

    def forward(self):
        if torch.is_grad_enabled():
            return self._compute()
        key = (self.table._version, self.table.data_ptr(), self.table.dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._compute())
        return self._cache[1]

    def _compute(self):
        n = self.index.shape[0]  # L
        # (L*L, heads) rows of the table -> (L, L, heads) -> (heads, L, L)
        return self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()


class Attention(nn.Module):
    """Multi-head attention with a relative position bias; `cross=True` takes keys/values from a context."""

    def __init__(self, dim, num_heads, side, cross=False):
        super().__init__()
        self.num_heads, self.cross = num_heads, cross
        if cross:
            self.to_q = nn.Linear(dim, dim)
            self.to_kv = nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_bias = RelativePositionBias(side, num_heads)

    def forward(self, x, ids_keep=None, context=None):
        """x (N, L, D) queries (L = K kept tokens when ids_keep (N, K) is given); context (N, L, D) the keys and
        values of cross-attention -> (N, L, D)."""
        n, length, dim = x.shape
        split = lambda z: z.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (N, L, D) -> (N, H, L, D/H)
        if self.cross:
            q, (k, v) = self.to_q(x), self.to_kv(context).chunk(2, dim=-1)  # (N, L, D) each
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # (N, L, 3D) -> 3 x (N, L, D)
        bias = self.rel_pos_bias()  # (H, L, L)
        if ids_keep is not None:  # the kept tokens' rows and columns, per sample: (H, N, K, K) -> (N, H, K, K)
            bias = bias[:, ids_keep[:, :, None], ids_keep[:, None, :]].transpose(0, 1)
        else:
            bias = bias.unsqueeze(0)  # (1, H, L, L): a 4-D mask lets SDPA take its fused kernel (3-D falls back)
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias.to(q.dtype))  # (N, H, L, D/H)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))  # (N, L, H, D/H) -> (N, L, D)


class Mlp(nn.Module):
    """The block's MLP: Linear, tanh-GELU, Linear."""
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """AdaLN-Zero transformer block: c gives shift, scale and gate for the attention and the MLP."""

    def __init__(self, dim, num_heads, side, mlp_ratio=4.0, cross=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, side, cross=cross)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def initialize_weights(self):
        """AdaLN-Zero: the modulation starts at zero, so the block starts as the identity."""
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x, c, ids_keep=None, context=None):
        """x (N, L, D) tokens, c (N, D) condition -> (N, L, D)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a), ids_keep, context)
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """AdaLN-modulated LayerNorm and a linear map from each token to its patch of outputs."""
    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def initialize_weights(self):
        """Zero modulation and zero output: a fresh network predicts zeros."""
        for layer in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, c):
        """x (N, L, D), c (N, D) -> (N, L, patch_size^2 * out_channels)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TDNet(nn.Module):
    """TDNet's parts, which XMDPT.forward runs: patch and timestep embedding, the encoder and decoder blocks and
    the output head.

    Blocks [0, depth - decode_layer) form the encoder; the rest form the decoder, which starts by adding
    `decoder_pos_embed`. In the masked forward the encoder sees only the kept tokens, and MIPNet restores the
    full sequence between encoder and decoder.
    """

    def __init__(self, input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                 out_channels, decode_layer):
        super().__init__()
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.side = self.x_embedder.side
        self.num_patches = self.side * self.side
        self.pos_embed = nn.Parameter(sincos_pos_embed(hidden_size, self.side).unsqueeze(0))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(hidden_size, self.side).unsqueeze(0))
        self.blocks = nn.ModuleList(Block(hidden_size, num_heads, self.side, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        self.split = depth - decode_layer
        self.patch_size, self.out_channels = patch_size, out_channels

    def initialize_weights(self):
        """The patch embedding like a linear layer, the timestep MLP N(0, 0.02), and AdaLN-Zero everywhere."""
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            block.initialize_weights()
        self.final_layer.initialize_weights()

    def embed(self, x):
        """Latents (N, C, H, W) -> tokens (N, L, D): patches plus the position embedding."""
        return self.x_embedder(x) + self.pos_embed

    def encode(self, h, c, ids_keep=None):
        """The encoder blocks on tokens (N, L or K, D); ids_keep (N, K) says which places kept tokens hold."""
        for block in self.blocks[:self.split]:
            h = block(h, c, ids_keep)
        return h

    def decode(self, h, c):
        """The decoder blocks on the whole sequence (N, L, D), decoder position embedding already added."""
        for block in self.blocks[self.split:]:
            h = block(h, c)
        return h

    def head(self, h, c):
        """The final layer: tokens (N, L, D) -> the prediction (N, out, H, W)."""
        return self.unpatchify(self.final_layer(h, c))

    def unpatchify(self, h):
        """(N, L, p * p * out) -> (N, out, H, W)."""
        n, length, _ = h.shape
        g, p = int(round(length ** 0.5)), self.patch_size
        h = h.reshape(n, g, g, p, p, self.out_channels)  # (N, rows, columns, p, p, out)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(n, self.out_channels, g * p, g * p)  # (N, out, H, W)
