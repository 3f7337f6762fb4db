"""VL adaptor: maps vision features to language-model embeddings (official `MlpProjector`)."""

from __future__ import annotations

import torch
from torch import nn

from .config import AlignerConfig


class MlpProjector(nn.Module):
    """`mlp_gelu` (1.3B): Linear → (GELU → Linear) × (depth-1).

    `low_high_hybrid_split_mlp_gelu` (7B): high and low features are each projected to half the LLM width and
    concatenated along the embedding axis (the paper's Table 10 winner), then (GELU → Linear) × (depth-1).
    """

    def __init__(self, cfg: AlignerConfig):
        super().__init__()
        self.hybrid = cfg.projector_type == "low_high_hybrid_split_mlp_gelu"
        if cfg.projector_type == "identity":
            self.layers = nn.Identity()
        elif cfg.projector_type == "linear":
            self.layers = nn.Linear(cfg.input_dim, cfg.n_embed)
        else:
            modules: list[nn.Module] = []
            if self.hybrid:
                self.high_up_proj = nn.Linear(cfg.input_dim, cfg.n_embed // 2)
                self.low_up_proj = nn.Linear(cfg.input_dim, cfg.n_embed // 2)
            else:
                modules.append(nn.Linear(cfg.input_dim, cfg.n_embed))
            for _ in range(1, cfg.depth):
                modules += [nn.GELU(), nn.Linear(cfg.n_embed, cfg.n_embed)]
            self.layers = nn.Sequential(*modules)

    def forward(self, features: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if isinstance(features, tuple):
            high, low = features
            features = torch.cat([self.high_up_proj(high), self.low_up_proj(low)], dim=-1)
        return self.layers(features)
