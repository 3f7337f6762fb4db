"""Checkpoint layouts. Our parameter names are the official checkpoint's keys; other layouts are mapped here.

- "official": deepseek-ai/deepseek-vl-*-chat (`model_type: multi_modality`), loaded as is.
- "community": deepseek-community/deepseek-vl-* for transformers' DeepseekVL / DeepseekVLHybrid classes.
"""

from __future__ import annotations

import torch

from .model.config import ConfigError, VLConfig

COMMUNITY_TYPES = ("deepseek_vl", "deepseek_vl_hybrid")


def official_config(raw: dict) -> tuple[VLConfig, str]:
    """Parse a config.json of either layout into our config; returns (config, layout)."""
    model_type = raw.get("model_type")
    if model_type in COMMUNITY_TYPES:
        return VLConfig.from_official(community_to_official(raw)), "community"
    return VLConfig.from_official(raw), "official"


def community_to_official(raw: dict) -> dict:
    raise ConfigError("the deepseek-community layout is not supported yet")


def map_key(key: str, layout: str) -> str:
    return key


def map_shape(key: str, shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    return shape


def map_tensor(key: str, tensor: torch.Tensor, layout: str) -> torch.Tensor:
    return tensor
