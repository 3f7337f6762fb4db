"""A tiny random DeepSeek-VL for tests: the real architecture (SigLIP tower, mlp_gelu adaptor, LLaMA) shrunk to a
few MB, built in a second with no download. It answers with gibberish; the trained demo model is `engine.demo`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .loading import save_pretrained
from .model.config import VLConfig
from .model.vlm import DeepSeekVL
from .processing import build_byte_level_tokenizer

VOCAB_SIZE = 1024

TINY_CONFIG = {
    "model_type": "multi_modality",
    "architectures": ["MultiModalityCausalLM"],
    "vision_config": {
        "cls": "CLIPVisionTower",
        "model_type": "vision",
        "params": {"model_name": "siglip_large_patch16_384", "image_size": 384, "select_feature": "same",
                   "select_layer": -1, "width": 64, "layers": 2, "heads": 4, "mlp_ratio": 4, "patch_size": 16},
    },
    "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                       "params": {"projector_type": "mlp_gelu", "depth": 2, "input_dim": 64, "n_embed": 128}},
    "language_config": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 352, "num_attention_heads": 4,
                        "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": VOCAB_SIZE,
                        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                        "tie_word_embeddings": False},
}
PREPROCESSOR = {"image_size": 384, "min_size": 14, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                "do_normalize": True, "image_processor_type": "VLMImageProcessor"}
CORPUS = [
    "User: Describe this image in detail.\n\nAssistant: The image shows a chart with three bars of different colours.",
    "User: What is written on the page?\n\nAssistant: The page has a title, two paragraphs and a table of numbers.",
    "User: Which figure is brighter?\n\nAssistant: The first figure is brighter; the second one is mostly dark blue.",
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language.",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \" # @ % & _",
    "screenshot screen window button menu text code error message terminal browser document PDF page photo picture",
]


def build_tiny(directory: str | Path, seed: int = 0, image_size: int = 384) -> Path:
    """`image_size` below 384 gives fewer image tokens ((size / 16)²): the training tests use 64 (16 tokens)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_byte_level_tokenizer(CORPUS * 4, VOCAB_SIZE, directory)
    torch.manual_seed(seed)
    config = json.loads(json.dumps(TINY_CONFIG))
    config["vision_config"]["params"]["image_size"] = image_size
    model = DeepSeekVL(VLConfig.from_official(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith(("pos_embed", "latent")):
                p.normal_(0.0, 0.02)
    save_pretrained(model, directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR, "image_size": image_size}, indent=1))
    return directory
