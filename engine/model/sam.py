"""SAM-B ViTDet image encoder as DeepSeek-VL uses it (the high-resolution half of the 7B's hybrid tower).

1024² input → 16-px patches (64×64 tokens) → blocks with 14×14 windowed attention, global attention at
`global_attn_indexes`, decomposed relative positions → neck (1×1 and 3×3 convs, channel LayerNorms) →
bilinear resize to 96×96 in float32 → two stride-2 convs → [B, 1024, 24, 24].
DeepSeek-VL adds a second path: the output of the first global-attention block goes through `neck_hd` and the
same downsample convs, and is added scaled by the learned scalar `hd_alpha_downsamples`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SAMConfig

LAYER_NORM_EPS = 1e-6
NECK_RESIZE = 96  # fixed by the official code: 96 / 2 / 2 = 24 → 576 tokens


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of an NCHW map."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + LAYER_NORM_EPS)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] -> [B,h,w,C]
        return self.proj(x).permute(0, 2, 3, 1)


class MLPBlock(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.lin2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


def relative_positions(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Embeddings of every (query, key) offset along one axis: [size, size, head_dim].

    Queries and keys have the same size here (windows or the full grid), so no resizing is needed."""
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + (size - 1)]


class Attention(nn.Module):
    # Bound the [chunk, N, N] bias tensor of global attention (N = 4096 for the real tower).
    GLOBAL_CHUNK = 4

    def __init__(self, width: int, heads: int, input_size: int):
        super().__init__()
        self.heads = heads
        head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        N = H * W
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.heads, N, -1).unbind(0)  # [B*heads, N, head_dim]

        # Decomposed relative positions: the unscaled query dotted with per-axis offset embeddings.
        Rh = relative_positions(H, self.rel_pos_h)
        Rw = relative_positions(W, self.rel_pos_w)
        r_q = q.reshape(B * self.heads, H, W, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)  # [B*heads, H, W, H]
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)  # [B*heads, H, W, W]

        out = torch.empty_like(q)
        for s in range(0, B * self.heads, self.GLOBAL_CHUNK):
            e = s + self.GLOBAL_CHUNK
            bias = (rel_h[s:e, :, :, :, None] + rel_w[s:e, :, :, None, :]).reshape(-1, N, N)
            out[s:e] = F.scaled_dot_product_attention(q[s:e], k[s:e], v[s:e], attn_mask=bias.to(q.dtype))
        out = out.view(B, self.heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, C)
        return self.proj(out)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B,H,W,C] -> [B*nw, window, window, C], zero-padding H and W up to multiples of `window`."""
    B, H, W, C = x.shape
    pad_h, pad_w = (window - H % window) % window, (window - W % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window, window, Wp // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, C), (Hp, Wp)


def window_unpartition(windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    Hp, Wp = padded
    H, W = size
    B = windows.shape[0] // (Hp * Wp // window // window)
    x = windows.view(B, Hp // window, Wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    return x[:, :H, :W, :].contiguous()


class Block(nn.Module):
    def __init__(self, width: int, heads: int, window_size: int, grid: int):
        super().__init__()
        self.window_size = window_size  # 0: global attention
        self.norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.attn = Attention(width, heads, input_size=window_size or grid)
        self.norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = MLPBlock(width, 4 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size:
            H, W = x.shape[1:3]
            x, padded = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, padded, (H, W))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


def _neck(width: int, channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(width, channels, kernel_size=1, bias=False),
        LayerNorm2d(channels),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(channels),
    )


class SAMViT(nn.Module):
    def __init__(self, cfg: SAMConfig):
        super().__init__()
        self.cfg = cfg
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, cfg.width))
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, 0 if i in cfg.global_attn_indexes else cfg.window_size, grid)
            for i in range(cfg.layers)
        )
        self.neck = _neck(cfg.width, cfg.neck_channels)
        convs, channels = [], cfg.neck_channels
        for out in cfg.downsample_channels:
            convs.append(nn.Conv2d(channels, out, kernel_size=3, stride=2, padding=1, bias=False))
            channels = out
        self.downsamples = nn.Sequential(*convs)
        self.hd_alpha_downsamples = nn.Parameter(torch.zeros(1))
        self.neck_hd = _neck(cfg.width, cfg.neck_channels)

    def _neck_and_downsample(self, neck: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = neck(x.permute(0, 3, 1, 2))
        # The official code resizes in float32 whatever the compute dtype.
        x = F.interpolate(x.float(), size=(NECK_RESIZE, NECK_RESIZE), mode="bilinear", align_corners=False).to(x.dtype)
        return self.downsamples(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [B,3,1024,1024] -> [B, C_out, 24, 24]
        x = self.patch_embed(pixels) + self.pos_embed
        first_global = None
        for block in self.blocks:
            x = block(x)
            if first_global is None and block.window_size == 0:
                first_global = x
        out = self._neck_and_downsample(self.neck, x)
        if first_global is not None:
            out = out + self._neck_and_downsample(self.neck_hd, first_global) * self.hd_alpha_downsamples
        return out
