"""Checkpoint layouts. Our parameter names are the official checkpoint's keys; other layouts are mapped here.

- "official": deepseek-ai/deepseek-vl-*-chat (`model_type: multi_modality`), loaded as is.
- "community": deepseek-community/deepseek-vl-* for transformers' `DeepseekVLForConditionalGeneration`
  (`model_type: deepseek_vl`, SigLIP only) and `DeepseekVLHybridForConditionalGeneration`
  (`deepseek_vl_hybrid`, SAM + SigLIP).

The community layout holds the same weights under other names, with three structural differences:

- transformers' SigLIP splits the fused `qkv` projection into `q_proj` / `k_proj` / `v_proj`, and its pooling head
  keeps query and key/value projections in one `in_proj` (ours: `q` and `kv`). A tensor of ours may therefore be
  several community tensors concatenated along dim 0, and one community tensor may feed two of ours: the mapping is
  written per key of ours as a list of `Piece`s (`community_pieces`), used in both directions.
- transformers' SigLIP position embedding is an `nn.Embedding` ([N, C]); timm's is [1, N, C].
- tensors the official forward never uses (SigLIP `attn_pool` head, hybrid `high_layer_norm` / `low_layer_norm`)
  are absent from community checkpoints (the conversion drops them). Our model still has them (the official
  checkpoint stores them), so they are filled with the neutral values a fresh module would have (`neutral`).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .model.config import SAM_SIZES, SIGLIP_SIZES, ConfigError, VLConfig

COMMUNITY_TYPES = ("deepseek_vl", "deepseek_vl_hybrid")

# (lazy tensor loader, shape): what the loader knows of a checkpoint tensor before reading it.
Entry = tuple[Callable[[], torch.Tensor], tuple[int, ...]]

# Official per-tower normalisation of the 7B hybrid. The community format keeps normalisation in its processor
# (`image_mean` for SigLIP, `high_res_image_mean` for SAM, the same values), so config.json does not carry it.
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The official hybrid resizes SAM's neck output to 96×96 and halves it twice: 24×24 = 576 tokens, which must equal
# the SigLIP token count for the aligner to concatenate them.
HYBRID_GRID = 24
# transformers' GELU names; the official towers use exact GELU whatever the community config says (see below).
GELU_ACTS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "quick_gelu", "gelu_python")
# Keys of a community config.json that describe the file, not the model.
META_KEYS = ("architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype")


# ---------------------------------------------------------------------------------------------- config
def official_config(raw: dict) -> tuple[VLConfig, str]:
    """Parse a config.json of either layout into our config; returns (config, layout)."""
    model_type = raw.get("model_type")
    if model_type in COMMUNITY_TYPES:
        return VLConfig.from_official(community_to_official(raw)), "community"
    return VLConfig.from_official(raw), "official"


def _sub_config(raw: dict, name: str, model_type: str, config_cls):
    """A community sub-config resolved with transformers' own defaults (what transformers would build)."""
    section = raw.get(name)
    if not isinstance(section, dict):
        raise ConfigError(f"community config.json ({raw.get('model_type')}) has no {name!r} section")
    found = section.get("model_type", model_type)
    if found != model_type:
        raise ConfigError(
            f"community config.json: {name}.model_type is {found!r}, but DeepSeek-VL's towers map only from "
            f"{model_type!r} (the deepseek-community conversion of the official checkpoints)"
        )
    try:
        return config_cls(**{k: v for k, v in section.items() if k != "model_type"})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"community config.json: invalid {name}: {e}") from e


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"community config.json cannot be mapped to the official architecture: {message}")


def _mlp_ratio(width: int, hidden: int) -> float:
    """A ratio whose `int(width * ratio)` gives back `hidden` (the official builder floors the product)."""
    ratio = hidden / width
    if int(width * ratio) != hidden:  # the float product landed just below the integer
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _table_entry(table: dict, size: dict, default: str) -> tuple[str, dict]:
    """The `model_name` whose table sizes equal `size`, else `default` plus the size-override keys that differ."""

    def same(a, b) -> bool:  # the tables hold tuples, JSON lists
        return list(a) == list(b) if isinstance(a, (list, tuple)) else a == b

    for name, entry in table.items():
        if all(same(entry[k], v) for k, v in size.items()):
            return name, {}
    return default, {k: v for k, v in size.items() if not same(table[default][k], v)}


def _siglip_params(vision) -> dict:
    width, hidden = int(vision.hidden_size), int(vision.intermediate_size)
    _require(vision.num_channels == 3, f"SigLIP num_channels {vision.num_channels} (RGB only)")
    _require(width % vision.num_attention_heads == 0, f"SigLIP hidden_size {width} not divisible by its heads")
    # The official tower is timm's ViT with exact GELU and LayerNorm eps 1e-6; the weights are the same whatever
    # activation variant / eps a community config names, so we build the official computation. A non-GELU
    # activation cannot come from an official tower.
    _require(vision.hidden_act in GELU_ACTS, f"SigLIP hidden_act {vision.hidden_act!r} (the official tower uses GELU)")
    image_size, patch = vision.image_size, vision.patch_size
    _require(isinstance(image_size, int) and isinstance(patch, int), "SigLIP image_size / patch_size must be square ints")
    size = dict(width=width, layers=int(vision.num_hidden_layers), heads=int(vision.num_attention_heads), patch_size=patch)

    def mlp_matches(entry: dict) -> bool:  # the MLP width, not the float ratio: 1152 × 3.7362 floors to 4304
        return int(size["width"] * entry["mlp_ratio"]) == hidden

    for name, entry in SIGLIP_SIZES.items():
        if all(entry[k] == v for k, v in size.items()) and mlp_matches(entry):
            overrides = {}
            break
    else:
        name = "siglip_large_patch16_384"
        entry = SIGLIP_SIZES[name]
        overrides = {k: v for k, v in size.items() if entry[k] != v}
        if not mlp_matches(entry):
            overrides["mlp_ratio"] = _mlp_ratio(width, hidden)
    # select_layer -1 builds every block; the community tower holds exactly the blocks built.
    return {"model_name": name, "image_size": image_size, "select_feature": "same", "select_layer": -1, **overrides}


def _sam_params(sam) -> dict:
    width, neck = int(sam.hidden_size), int(sam.output_channels)
    # Fixed by the official builder (SAM-B ViTDet): anything else is a different architecture.
    _require(sam.image_size == 1024 and sam.patch_size == 16, f"SAM image_size/patch_size {sam.image_size}/{sam.patch_size} (official: 1024/16)")
    _require(sam.window_size == 14, f"SAM window_size {sam.window_size} (official: 14)")
    _require(sam.num_channels == 3, f"SAM num_channels {sam.num_channels} (RGB only)")
    _require(int(sam.mlp_dim) == 4 * width, f"SAM mlp_dim {sam.mlp_dim} (official: 4 × hidden_size = {4 * width})")
    _require(sam.qkv_bias and sam.use_abs_pos and sam.use_rel_pos, "SAM without qkv bias / absolute / relative positions")
    _require(sam.hidden_act in GELU_ACTS, f"SAM hidden_act {sam.hidden_act!r} (the official encoder uses GELU)")
    _require(width % sam.num_attention_heads == 0, f"SAM hidden_size {width} not divisible by its heads")
    globals_ = [int(i) for i in sam.global_attn_indexes]
    _require(bool(globals_) and all(0 <= i < sam.num_hidden_layers for i in globals_),
             f"SAM global_attn_indexes {globals_} (need at least one, within {sam.num_hidden_layers} layers)")
    # transformers' projection is two stride-2 convs to 2× and 4× the neck width; our extension key (written by
    # `to_community` for models transformers cannot express) overrides it.
    downsample = [int(c) for c in getattr(sam, "downsample_channels", None) or (2 * neck, 4 * neck)]
    _require(len(downsample) == 2, f"SAM downsample_channels {downsample} (the hybrid needs two downsample convs)")
    size = dict(width=width, layers=int(sam.num_hidden_layers), heads=int(sam.num_attention_heads),
                global_attn_indexes=globals_, downsample_channels=downsample)
    name, overrides = _table_entry(SAM_SIZES, size, "sam_b_downsample")
    if neck != 256:  # the official `prompt_embed_dim`
        overrides["prompt_embed_dim"] = neck
    return {"model_name": name, "image_size": 1024, "output_dim": downsample[-1], "select_feature": "same",
            "select_layer": -1, "ckpt_path": "", **overrides}


def community_to_official(raw: dict) -> dict:
    """A deepseek-community config.json as the official `multi_modality` config.json that builds the same model.

    Sizes come from transformers' sub-configs (with transformers' defaults for absent keys) and are written as the
    reference's size-override keys beside the official `model_name`, so any size maps; a config whose sizes are the
    official table's maps to the official config.json without overrides. Raises ConfigError for anything the
    official architecture cannot express.
    """
    from transformers import LlamaConfig, SamVisionConfig, SiglipVisionConfig

    model_type = raw.get("model_type")
    if model_type not in COMMUNITY_TYPES:
        raise ConfigError(f"not a deepseek-community config: model_type {model_type!r} (expected one of {COMMUNITY_TYPES})")
    hybrid = model_type == "deepseek_vl_hybrid"
    if not hybrid and "high_res_vision_config" in raw:
        raise ConfigError("model_type 'deepseek_vl' has no high-resolution tower; a SAM + SigLIP model is 'deepseek_vl_hybrid'")

    vision = _sub_config(raw, "vision_config", "siglip_vision_model", SiglipVisionConfig)
    text = _sub_config(raw, "text_config", "llama", LlamaConfig)
    low = _siglip_params(vision)
    width, n_embed = int(vision.hidden_size), int(text.hidden_size)

    # The official language_config: the community text_config as it is (LlamaConfig has the same defaults on both
    # sides), untied: the official checkpoints keep a separate lm_head, and so must a community one.
    language = {k: copy.deepcopy(v) for k, v in raw["text_config"].items() if k not in META_KEYS}
    language["model_type"] = "llama"
    language["tie_word_embeddings"] = False

    if hybrid:
        sam = _sub_config(raw, "high_res_vision_config", "sam_vision_model", SamVisionConfig)
        high = _sam_params(sam)
        grid = low["image_size"] // vision.patch_size
        _require(grid == HYBRID_GRID, f"hybrid SigLIP grid {grid}×{grid}; the official hybrid fixes SAM's output at {HYBRID_GRID}×{HYBRID_GRID}")
        # The official aligner has one `input_dim` for both up-projections.
        _require(high["output_dim"] == width, f"hybrid SAM features ({high['output_dim']}) and SigLIP features ({width}) differ in width")
        _require(n_embed % 2 == 0, f"text hidden_size {n_embed} is odd (the hybrid aligner splits it in halves)")
        high.update(pixel_mean=list(getattr(sam, "pixel_mean", None) or CLIP_MEAN), pixel_std=list(getattr(sam, "pixel_std", None) or CLIP_STD))
        low.update(output_dim=width, ckpt_path="", pixel_mean=list(getattr(vision, "pixel_mean", None) or SIGLIP_MEAN),
                   pixel_std=list(getattr(vision, "pixel_std", None) or SIGLIP_STD))
        vision_config = {"cls": "HybridVisionTower", "model_type": "vision",
                         "params": {"concat_type": "tuple", "freeze_high": True, "freeze_low": True, "high_res_cfg": high, "low_res_cfg": low}}
        projector = "low_high_hybrid_split_mlp_gelu"
    else:
        # No per-tower normalisation: like the official 1.3B, the processor normalises.
        vision_config = {"cls": "CLIPVisionTower", "model_type": "vision", "params": low}
        projector = "mlp_gelu"
    return {
        "model_type": "multi_modality",
        "architectures": ["MultiModalityCausalLM"],
        "vision_config": vision_config,
        # transformers' aligners are Linear → GELU → Linear: the official depth-2 projectors.
        "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                           "params": {"projector_type": projector, "depth": 2, "input_dim": width, "n_embed": n_embed}},
        "language_config": language,
    }


# ---------------------------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class Piece:
    """`ours[ours_rows] == community[key][rows]` (dim 0 slices; None = the whole tensor)."""

    key: str
    rows: tuple[int, int] | None = None
    ours_rows: tuple[int, int] | None = None
    squeeze: bool = False  # the community tensor lacks our leading singleton dim (SigLIP position embedding)


_SIGLIP = "model.vision_model."  # transformers 5; transformers 4 saved `model.vision_model.vision_model.`
_SIGLIP_V4 = "model.vision_model.vision_model."
_SAM = "model.high_res_vision_model.vision_encoder."
_NECK = {"0": "conv1", "1": "layer_norm1", "2": "conv2", "3": "layer_norm2"}

# Ours → community for single-tensor renames; `{t}` is our tower prefix. Group references use regex syntax.
_SIGLIP_RULES = [
    (r"{t}pos_embed", _SIGLIP + "embeddings.position_embedding.weight"),
    (r"{t}patch_embed\.proj\.(weight|bias)", _SIGLIP + r"embeddings.patch_embedding.\1"),
    (r"{t}blocks\.(\d+)\.norm([12])\.(weight|bias)", _SIGLIP + r"encoder.layers.\1.layer_norm\2.\3"),
    (r"{t}blocks\.(\d+)\.attn\.proj\.(weight|bias)", _SIGLIP + r"encoder.layers.\1.self_attn.out_proj.\2"),
    (r"{t}blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", _SIGLIP + r"encoder.layers.\1.mlp.\2.\3"),
    (r"{t}norm\.(weight|bias)", _SIGLIP + r"post_layernorm.\1"),
    (r"{t}attn_pool\.latent", _SIGLIP + "head.probe"),
    (r"{t}attn_pool\.proj\.(weight|bias)", _SIGLIP + r"head.attention.out_proj.\1"),
    (r"{t}attn_pool\.norm\.(weight|bias)", _SIGLIP + r"head.layernorm.\1"),
    (r"{t}attn_pool\.mlp\.(fc[12])\.(weight|bias)", _SIGLIP + r"head.mlp.\1.\2"),
]
_SAM_RULES = [
    (r"{t}pos_embed", _SAM + "pos_embed"),
    (r"{t}patch_embed\.proj\.(weight|bias)", _SAM + r"patch_embed.projection.\1"),
    (r"{t}blocks\.(\d+)\.norm([12])\.(weight|bias)", _SAM + r"layers.\1.layer_norm\2.\3"),
    (r"{t}blocks\.(\d+)\.attn\.(qkv\.weight|qkv\.bias|proj\.weight|proj\.bias|rel_pos_h|rel_pos_w)", _SAM + r"layers.\1.attn.\2"),
    (r"{t}blocks\.(\d+)\.mlp\.(lin[12])\.(weight|bias)", _SAM + r"layers.\1.mlp.\2.\3"),
    # SAM's own neck is inside transformers' encoder; DeepSeek-VL's additions sit beside it in the hybrid model.
    (r"{t}neck\.([0-3])\.(weight|bias)", lambda m: _SAM + f"neck.{_NECK[m[1]]}.{m[2]}"),
    (r"{t}neck_hd\.([0-3])\.(weight|bias)", lambda m: f"model.high_res_vision_neck.{_NECK[m[1]]}.{m[2]}"),
    (r"{t}downsamples\.([01])\.weight", lambda m: f"model.high_res_vision_proj.conv{int(m[1]) + 1}.weight"),
    (r"{t}hd_alpha_downsamples", "model.high_res_vision_alpha"),
]
_SINGLE_ALIGNER = [(r"aligner\.layers\.0\.(weight|bias)", r"model.aligner.linear1.\1"),
                   (r"aligner\.layers\.2\.(weight|bias)", r"model.aligner.linear2.\1")]
_HYBRID_ALIGNER = [(r"aligner\.high_up_proj\.(weight|bias)", r"model.aligner.high_res_vision_proj.\1"),
                   (r"aligner\.low_up_proj\.(weight|bias)", r"model.aligner.vision_proj.\1"),
                   (r"aligner\.layers\.1\.(weight|bias)", r"model.aligner.proj.\1")]
_LANGUAGE = [(r"language_model\.model\.(.+)", r"model.language_model.\1"),
             (r"language_model\.lm_head\.weight", "lm_head.weight")]

# Ours with no community counterpart that the official forward never uses. `neutral` gives the value a fresh module
# has (LayerNorm: weight 1, bias 0; the rest 0), so a filled model behaves like the official one.
_UNUSED = re.compile(r"vision_model\.(high|low)_layer_norm\.(weight|bias)|.*\.attn_pool\..+")


def neutral(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.ones(shape) if re.search(r"norm\.weight$", key) else torch.zeros(shape)


def _siglip_prefix(hybrid: bool) -> str:
    return "vision_model.vision_tower_low.vision_tower." if hybrid else "vision_model.vision_tower."


def community_pieces(key: str, shape: tuple[int, ...], hybrid: bool) -> list[Piece] | None:
    """Where our tensor `key` (of `shape`) lives in a community checkpoint; None: nowhere (an unused tensor)."""
    siglip = re.escape(_siglip_prefix(hybrid))
    m = re.fullmatch(siglip + r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key)
    if m:  # fused qkv ← q_proj, k_proj, v_proj stacked along the output dim
        third = shape[0] // 3
        return [Piece(_SIGLIP + f"encoder.layers.{m[1]}.self_attn.{p}_proj.{m[2]}", ours_rows=(i * third, (i + 1) * third))
                for i, p in enumerate("qkv")]
    m = re.fullmatch(siglip + r"attn_pool\.(q|kv)\.(weight|bias)", key)
    if m:  # nn.MultiheadAttention's in_proj holds q, then k and v: ours q = rows [0, C), kv = rows [C, 3C)
        width = shape[0] if m[1] == "q" else shape[0] // 2
        rows = (0, width) if m[1] == "q" else (width, 3 * width)
        return [Piece(_SIGLIP + f"head.attention.in_proj_{m[2]}", rows=rows)]

    rules = [(p.replace("{t}", siglip), r) for p, r in _SIGLIP_RULES]
    if hybrid:
        sam = re.escape("vision_model.vision_tower_high.vision_tower.")
        rules += [(p.replace("{t}", sam), r) for p, r in _SAM_RULES] + _HYBRID_ALIGNER
    else:
        rules += _SINGLE_ALIGNER
    for pattern, target in rules + _LANGUAGE:
        m = re.fullmatch(pattern, key)
        if m:
            name = target(m) if callable(target) else m.expand(target)
            return [Piece(name, squeeze=name.endswith("position_embedding.weight"))]
    return None


def _is_hybrid(keys) -> bool:
    return any(k.startswith("vision_model.vision_tower_high.") for k in keys)


def remap(checkpoint: dict[str, Entry], layout: str, expected: dict[str, tuple[int, ...]]) -> dict[str, Entry]:
    """Checkpoint entries (its keys) → entries under our keys, each a lazy loader of the final tensor and its shape.

    `expected` is our model's state_dict shapes. Checkpoint tensors no key of ours uses are passed through under their
    own names, and keys of ours whose tensors are missing are left out, so the strict loader reports both.
    """
    if layout == "official":
        return dict(checkpoint)
    if layout != "community":
        raise ConfigError(f"unknown checkpoint layout {layout!r}")
    # transformers 4 nested SigLIP one level deeper (the hub's deepseek-community files); 5 loads both.
    checkpoint = {(_SIGLIP + k[len(_SIGLIP_V4):] if k.startswith(_SIGLIP_V4) else k): v for k, v in checkpoint.items()}
    if "lm_head.weight" not in checkpoint and "model.language_model.embed_tokens.weight" in checkpoint:
        raise ConfigError(
            "the checkpoint has no lm_head.weight: it was saved with tied word embeddings (transformers' default for "
            "DeepseekVL is tie_word_embeddings=true), which drops the output head. DeepSeek-VL's lm_head is separate "
            "from its input embeddings, so this checkpoint cannot reproduce the official model; use one saved with "
            "tie_word_embeddings=false, or the official deepseek-ai checkpoint"
        )
    hybrid = _is_hybrid(expected)
    has_head = any(k.startswith(_SIGLIP + "head.") for k in checkpoint)
    entries: dict[str, Entry] = {}
    used: set[str] = set()
    for key, shape in expected.items():
        pieces = community_pieces(key, shape, hybrid)
        if pieces is None or (".attn_pool." in key and not has_head):
            # Absent from every community checkpoint (or the SigLIP head as a whole, `vision_use_head: false`).
            if _UNUSED.fullmatch(key):
                entries[key] = ((lambda k=key, s=shape: neutral(k, s)), shape)
            continue
        if any(p.key not in checkpoint for p in pieces):
            continue  # reported as missing by the loader
        used.update(p.key for p in pieces)
        entries[key] = (_merged_loader(pieces, checkpoint), _merged_shape(pieces, checkpoint))
    entries.update({k: v for k, v in checkpoint.items() if k not in used})
    return entries


def _merged_shape(pieces: list[Piece], checkpoint: dict[str, Entry]) -> tuple[int, ...]:
    shapes = []
    for p in pieces:
        shape = checkpoint[p.key][1]
        if p.rows is not None:
            shape = (p.rows[1] - p.rows[0], *shape[1:]) if shape and shape[0] >= p.rows[1] else (-1, *shape[1:])
        shapes.append((1, *shape) if p.squeeze else tuple(shape))
    if len({s[1:] for s in shapes}) > 1:  # pieces that cannot be stacked: let the shape check report the first one
        return shapes[0]
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def _merged_loader(pieces: list[Piece], checkpoint: dict[str, Entry]) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        parts = []
        for p in pieces:
            t = checkpoint[p.key][0]()
            if p.rows is not None:
                t = t[p.rows[0] : p.rows[1]]
            parts.append(t.unsqueeze(0) if p.squeeze else t)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    return load


# ---------------------------------------------------------------------------------------------- export
def to_community(model, *, image_token_id: int = 100015, vision_use_head: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our model as a deepseek-community checkpoint: (config.json dict, state dict).

    As the hub's conversion does, the unused SigLIP head is left out unless `vision_use_head`, and the hybrid's unused
    high/low LayerNorms always are. `image_token_id` is the tokenizer's `<image_placeholder>` id (100015 in the
    DeepSeek tokenizer), which transformers' forward uses to find image positions. Sizes transformers cannot express
    are written as extension keys this module reads back (`downsample_channels`, `pixel_mean`, `pixel_std`); transformers
    then fails to load such a checkpoint rather than compute something else.
    """
    cfg: VLConfig = model.config
    hybrid = cfg.vision.hybrid
    want = "low_high_hybrid_split_mlp_gelu" if hybrid else "mlp_gelu"
    if cfg.aligner.projector_type != want or cfg.aligner.depth != 2:
        raise ConfigError(
            f"aligner {cfg.aligner.projector_type!r} depth {cfg.aligner.depth}: transformers' DeepseekVL aligner is "
            f"Linear → GELU → Linear ({want!r}, depth 2)"
        )
    low = cfg.vision.low
    vision = {"model_type": "siglip_vision_model", "hidden_size": low.width, "intermediate_size": int(low.width * low.mlp_ratio),
              "num_hidden_layers": low.layers, "num_attention_heads": low.heads, "num_channels": 3, "image_size": low.image_size,
              "patch_size": low.patch_size, "hidden_act": "gelu", "layer_norm_eps": 1e-6, "vision_use_head": vision_use_head}
    config = {"model_type": "deepseek_vl_hybrid" if hybrid else "deepseek_vl",
              "architectures": ["DeepseekVLHybridForConditionalGeneration" if hybrid else "DeepseekVLForConditionalGeneration"],
              "image_token_id": image_token_id,
              # Explicit: transformers' DeepseekVL configs default to tied embeddings; DeepSeek-VL's are not.
              "tie_word_embeddings": False,
              "text_config": {**{k: v for k, v in cfg.to_official()["language_config"].items() if k not in META_KEYS},
                              "model_type": "llama", "tie_word_embeddings": False},
              "vision_config": vision}
    if hybrid:
        high = cfg.vision.high
        if len(high.downsample_channels) != 2:
            raise ConfigError(f"SAM downsample_channels {high.downsample_channels}: the hybrid needs two downsample convs")
        sam = {"model_type": "sam_vision_model", "hidden_size": high.width, "output_channels": high.neck_channels,
               "num_hidden_layers": high.layers, "num_attention_heads": high.heads, "num_channels": 3, "image_size": 1024,
               "patch_size": 16, "window_size": high.window_size, "global_attn_indexes": list(high.global_attn_indexes),
               "mlp_dim": 4 * high.width, "hidden_act": "gelu", "layer_norm_eps": 1e-6}
        if list(high.downsample_channels) != [2 * high.neck_channels, 4 * high.neck_channels]:
            sam["downsample_channels"] = list(high.downsample_channels)
        for section, tower, mean, std in ((sam, high, CLIP_MEAN, CLIP_STD), (vision, low, SIGLIP_MEAN, SIGLIP_STD)):
            if not _close(tower.pixel_mean, mean) or not _close(tower.pixel_std, std):
                section.update(pixel_mean=list(tower.pixel_mean), pixel_std=list(tower.pixel_std))
        config["high_res_vision_config"] = sam

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    pieces_of: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, tensor in state.items():
        pieces = community_pieces(key, tuple(tensor.shape), hybrid)
        if pieces is None or (".attn_pool." in key and not vision_use_head):
            continue
        for p in pieces:
            part = tensor if p.ours_rows is None else tensor[p.ours_rows[0] : p.ours_rows[1]]
            part = part.squeeze(0) if p.squeeze else part
            pieces_of.setdefault(p.key, []).append((p.rows[0] if p.rows else 0, part))
    # A community tensor made of several of ours (the head's in_proj) is stacked in row order.
    out = {k: torch.cat([t for _, t in sorted(parts, key=lambda x: x[0])]).contiguous() for k, parts in pieces_of.items()}
    return config, out


def _close(values, reference) -> bool:
    return values is not None and len(values) == len(reference) and all(abs(a - b) < 1e-7 for a, b in zip(values, reference))
