"""Configuration of a DeepSeek-VL model: vision tower(s), adaptor and language model.

The official checkpoints ship a `config.json` with `model_type: multi_modality` and three sub-configs
(`vision_config`, `aligner_config`, `language_config`). Tower sizes are not in that file: the official code
looks them up by `model_name` in a table (`SIGLIP_SIZES`, `SAM_SIZES` below). Small test models override the
table through extra keys beside `model_name` (see shared/reference/README.md).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from transformers import LlamaConfig


class ConfigError(ValueError):
    """A config.json that is not a DeepSeek-VL config we can build."""


# The official tables of tower sizes, keyed by `model_name`.
SIGLIP_SIZES = {
    "siglip_so400m_patch14_384": dict(image_size=336, patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=3.7362),
    "siglip_so400m_patch14_224": dict(image_size=224, patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=3.7362),
    "siglip_large_patch16_384": dict(image_size=384, patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4),
}
SAM_SIZES = {
    "sam_vit_b": dict(width=768, layers=12, heads=12, global_attn_indexes=(2, 5, 8, 11), downsample_channels=()),
    "sam_b_downsample": dict(width=768, layers=12, heads=12, global_attn_indexes=(2, 5, 8, 11), downsample_channels=(512, 1024)),
    "sam_vit_l": dict(width=1024, layers=24, heads=16, global_attn_indexes=(5, 11, 17, 23), downsample_channels=(512, 1024)),
    "sam_vit_h": dict(width=1280, layers=32, heads=16, global_attn_indexes=(7, 15, 23, 31), downsample_channels=(512, 1024)),
}
PROJECTOR_TYPES = ("identity", "linear", "mlp_gelu", "low_high_hybrid_split_mlp_gelu")


@dataclass
class SigLIPConfig:
    """SigLIP ViT (timm layout, no class token, `map` pooling head kept only for loading)."""

    model_name: str = "siglip_large_patch16_384"
    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24  # blocks actually built (after applying select_layer)
    heads: int = 16
    mlp_ratio: float = 4.0
    select_layer: int = -1
    pixel_mean: tuple[float, ...] | None = None  # per-tower normalisation (hybrid); None: processor normalises
    pixel_std: tuple[float, ...] | None = None

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_params(cls, params: dict) -> "SigLIPConfig":
        name = params.get("model_name", "siglip_large_patch16_384")
        if name not in SIGLIP_SIZES:
            raise ConfigError(f"unknown SigLIP model_name {name!r}; known: {sorted(SIGLIP_SIZES)}")
        size = {**SIGLIP_SIZES[name], **{k: params[k] for k in ("width", "layers", "heads", "mlp_ratio", "patch_size") if k in params}}
        select_layer = int(params.get("select_layer", -1))
        table_layers = size["layers"]
        # Official rule: select_layer <= 0 counts from the end, > 0 from the start; only these blocks exist.
        built = min(table_layers, table_layers + select_layer + 1) if select_layer <= 0 else min(table_layers, select_layer)
        return cls(
            model_name=name,
            image_size=int(params.get("image_size", size["image_size"])),
            patch_size=size["patch_size"],
            width=size["width"],
            layers=built,
            heads=size["heads"],
            mlp_ratio=size["mlp_ratio"],
            select_layer=select_layer,
            pixel_mean=_tuple_or_none(params.get("pixel_mean")),
            pixel_std=_tuple_or_none(params.get("pixel_std")),
        )


@dataclass
class SAMConfig:
    """SAM ViTDet image encoder with DeepSeek-VL's downsampling convs and `neck_hd` branch."""

    model_name: str = "sam_b_downsample"
    image_size: int = 1024  # fixed by the official builder
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    neck_channels: int = 256  # `prompt_embed_dim` in the official code
    downsample_channels: tuple[int, ...] = (512, 1024)
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None

    @classmethod
    def from_params(cls, params: dict) -> "SAMConfig":
        name = params.get("model_name", "sam_b_downsample")
        if name not in SAM_SIZES:
            raise ConfigError(f"unknown SAM model_name {name!r}; known: {sorted(SAM_SIZES)}")
        size = {**SAM_SIZES[name], **{k: params[k] for k in ("width", "layers", "heads", "global_attn_indexes", "downsample_channels") if k in params}}
        return cls(
            model_name=name,
            width=size["width"],
            layers=size["layers"],
            heads=size["heads"],
            global_attn_indexes=tuple(size["global_attn_indexes"]),
            neck_channels=int(params.get("prompt_embed_dim", 256)),
            downsample_channels=tuple(size["downsample_channels"]),
            pixel_mean=_tuple_or_none(params.get("pixel_mean")),
            pixel_std=_tuple_or_none(params.get("pixel_std")),
        )

    @property
    def out_channels(self) -> int:
        return self.downsample_channels[-1] if self.downsample_channels else self.neck_channels


@dataclass
class VisionConfig:
    """Either SigLIP alone (1.3B) or the SAM (high) + SigLIP (low) hybrid (7B)."""

    low: SigLIPConfig
    high: SAMConfig | None = None
    high_output_dim: int = 1024  # sizes of the hybrid's (unused) high/low LayerNorms
    low_output_dim: int = 1024

    @property
    def hybrid(self) -> bool:
        return self.high is not None

    @property
    def input_size(self) -> int:
        """Side of the square image the model takes (the processor's `image_size`)."""
        return self.high.image_size if self.high else self.low.image_size

    @property
    def num_image_tokens(self) -> int:
        return self.low.grid**2


@dataclass
class AlignerConfig:
    projector_type: str = "mlp_gelu"
    depth: int = 2
    input_dim: int = 1024
    n_embed: int = 2048


@dataclass
class VLConfig:
    vision: VisionConfig
    aligner: AlignerConfig
    language: LlamaConfig
    official: dict = field(default_factory=dict)  # the config.json it came from, written back on save

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_image_tokens

    @property
    def max_context(self) -> int:
        return self.language.max_position_embeddings

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_official(cls, cfg: dict) -> "VLConfig":
        model_type = cfg.get("model_type")
        if model_type != "multi_modality":
            raise ConfigError(
                f"unsupported model_type {model_type!r}: expected 'multi_modality' (an official DeepSeek-VL "
                "config.json) or a deepseek-community checkpoint (model_type 'deepseek_vl' / 'deepseek_vl_hybrid')"
            )
        for key in ("vision_config", "aligner_config", "language_config"):
            if not isinstance(cfg.get(key), dict):
                raise ConfigError(f"config.json has no {key!r} section")
        vision_cfg = cfg["vision_config"]
        vparams = vision_cfg.get("params", {})
        tower_cls = vision_cfg.get("cls", "CLIPVisionTower")
        if tower_cls == "HybridVisionTower":
            high_p, low_p = vparams["high_res_cfg"], vparams["low_res_cfg"]
            if vparams.get("concat_type", "tuple") != "tuple":
                raise ConfigError(f"hybrid concat_type {vparams.get('concat_type')!r} is not supported (official: 'tuple')")
            vision = VisionConfig(
                low=SigLIPConfig.from_params(low_p),
                high=SAMConfig.from_params(high_p),
                high_output_dim=int(high_p.get("output_dim", 1024)),
                low_output_dim=int(low_p.get("output_dim", 1024)),
            )
        elif tower_cls == "CLIPVisionTower":
            if not str(vparams.get("model_name", "siglip")).startswith("siglip"):
                raise ConfigError(f"vision tower {vparams.get('model_name')!r} is not supported (SigLIP only)")
            vision = VisionConfig(low=SigLIPConfig.from_params(vparams))
        else:
            raise ConfigError(f"unknown vision tower class {tower_cls!r}")

        aparams = cfg["aligner_config"].get("params", {})
        aligner = AlignerConfig(
            projector_type=aparams.get("projector_type", "mlp_gelu"),
            depth=int(aparams.get("depth", 1)),
            input_dim=int(aparams.get("input_dim", 1024)),
            n_embed=int(aparams.get("n_embed", 2048)),
        )
        if aligner.projector_type not in PROJECTOR_TYPES:
            raise ConfigError(f"unknown projector_type {aligner.projector_type!r}; known: {PROJECTOR_TYPES}")

        lang = {k: v for k, v in cfg["language_config"].items() if k != "model_type"}
        if cfg["language_config"].get("model_type", "llama") != "llama":
            raise ConfigError("only a llama language model is supported")
        language = LlamaConfig(**lang)
        return cls(vision=vision, aligner=aligner, language=language, official=copy.deepcopy(cfg))

    def to_official(self) -> dict:
        return copy.deepcopy(self.official)


def _tuple_or_none(value):
    return tuple(float(v) for v in value) if value is not None else None


# ---------------------------------------------------------------------- presets
# The config.json files of the official chat checkpoints (deepseek-ai/deepseek-vl-{1.3b,7b}-chat).
OFFICIAL_1_3B = {
    "model_type": "multi_modality",
    "architectures": ["MultiModalityCausalLM"],
    "vision_config": {
        "cls": "CLIPVisionTower",
        "model_type": "vision",
        "params": {"model_name": "siglip_large_patch16_384", "image_size": 384, "select_feature": "same", "select_layer": -1},
    },
    "aligner_config": {
        "cls": "MlpProjector",
        "model_type": "aligner",
        "params": {"projector_type": "mlp_gelu", "depth": 2, "input_dim": 1024, "n_embed": 2048},
    },
    "language_config": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "vocab_size": 102400,
        "max_position_embeddings": 16384,
    },
}
_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
OFFICIAL_7B = {
    "model_type": "multi_modality",
    "architectures": ["MultiModalityCausalLM"],
    "vision_config": {
        "cls": "HybridVisionTower",
        "model_type": "vision",
        "params": {
            "concat_type": "tuple",
            "freeze_high": True,
            "freeze_low": True,
            "high_res_cfg": {
                "model_name": "sam_b_downsample", "image_size": 1024, "output_dim": 1024, "select_feature": "same",
                "select_layer": -1, "ckpt_path": "", "pixel_mean": _CLIP_MEAN, "pixel_std": _CLIP_STD,
            },
            "low_res_cfg": {
                "model_name": "siglip_large_patch16_384", "image_size": 384, "output_dim": 1024, "select_feature": "same",
                "select_layer": -1, "ckpt_path": "", "pixel_mean": [0.5, 0.5, 0.5], "pixel_std": [0.5, 0.5, 0.5],
            },
        },
    },
    "aligner_config": {
        "cls": "MlpProjector",
        "model_type": "aligner",
        "params": {"projector_type": "low_high_hybrid_split_mlp_gelu", "depth": 2, "input_dim": 1024, "n_embed": 4096},
    },
    "language_config": {"model_type": "llama", "num_hidden_layers": 30, "vocab_size": 102400, "max_position_embeddings": 16384},
}


def deepseek_vl_1_3b() -> VLConfig:
    return VLConfig.from_official(OFFICIAL_1_3B)


def deepseek_vl_7b() -> VLConfig:
    return VLConfig.from_official(OFFICIAL_7B)
