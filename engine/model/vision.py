"""Vision towers: SigLIP alone (1.3B) or the SAM + SigLIP hybrid (7B).

Module names follow the official `CLIPVisionTower` / `HybridVisionTower` so checkpoint keys load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SAMConfig, SigLIPConfig, VisionConfig
from .sam import SAMViT
from .siglip import SigLIPViT


class Tower(nn.Module):
    """One tower plus its own pixel normalisation (official `CLIPVisionTower`). Output: [B, tokens, C]."""

    def __init__(self, cfg: SigLIPConfig | SAMConfig):
        super().__init__()
        self.vision_tower = SigLIPViT(cfg) if isinstance(cfg, SigLIPConfig) else SAMViT(cfg)
        normalise = cfg.pixel_mean is not None and cfg.pixel_std is not None
        self.normalise = normalise
        # Not persistent: the checkpoint stores no normalisation tensors.
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean or (0.0,) * 3).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std or (1.0,) * 3).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.normalise:
            pixels = (pixels - self.pixel_mean.to(pixels.dtype)) / self.pixel_std.to(pixels.dtype)
        features = self.vision_tower(pixels)
        if features.dim() == 4:  # SAM: [B, C, h, w] -> [B, h*w, C]
            features = features.flatten(2).transpose(1, 2)
        return features


class HybridVisionTower(nn.Module):
    """SAM sees the 1024² image, SigLIP a 384² view of the same padded tensor. Returns (high, low)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.low_res_size = cfg.low.image_size
        self.vision_tower_high = Tower(cfg.high)
        self.vision_tower_low = Tower(cfg.low)
        # Stored in the checkpoint but never applied by the official forward.
        self.high_layer_norm = nn.LayerNorm(cfg.high_output_dim)
        self.low_layer_norm = nn.LayerNorm(cfg.low_output_dim)

    def low_res_view(self, pixels: torch.Tensor) -> torch.Tensor:
        size = (self.low_res_size, self.low_res_size)
        # torchvision's Resize(antialias=True) on a tensor: bilinear with antialiasing (needs float on CPU).
        return F.interpolate(pixels.float(), size=size, mode="bilinear", align_corners=False, antialias=True).to(pixels.dtype)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [B,3,1024,1024] in [0,1]
        high = self.vision_tower_high(pixels)  # [B, 576, C_high]
        low = self.vision_tower_low(self.low_res_view(pixels))  # [B, 576, C_low]
        return high, low


def build_vision(cfg: VisionConfig) -> nn.Module:
    """The 1.3B's tower is a plain `Tower` (its processor normalises); the 7B's is the hybrid."""
    return HybridVisionTower(cfg) if cfg.hybrid else Tower(cfg.low)
