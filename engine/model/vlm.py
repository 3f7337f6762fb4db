"""The multimodal causal LM (official `MultiModalityCausalLM`), top to bottom as in the paper's figure:

    pixels ─► vision_model ─► aligner ─► image embeddings [n_images, 576, D]
    input_ids ─► embed_tokens ─► splice image embeddings at image-token positions ─► LlamaForCausalLM ─► logits
"""

from __future__ import annotations

import torch
from torch import nn

from .adaptor import MlpProjector
from .config import VLConfig
from .llama import LlamaForCausalLM
from .vision import build_vision


class DeepSeekVL(nn.Module):
    def __init__(self, cfg: VLConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = build_vision(cfg.vision)
        self.aligner = MlpProjector(cfg.aligner)
        self.language_model = LlamaForCausalLM(cfg.language)

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

    def vision_dtype(self) -> torch.dtype:
        return next(self.vision_model.parameters()).dtype

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] → [N, 576, D] image embeddings in the language model's input space."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.vision_dtype())
        features = self.vision_model(pixel_values)
        return self.aligner(features).to(self.dtype)

    def embed(
        self,
        input_ids: torch.Tensor,  # [B, T]
        images_seq_mask: torch.Tensor | None = None,  # [B, T] True at image-token positions
        image_embeds: torch.Tensor | None = None,  # [M, D] rows in the order of the True positions
    ) -> torch.Tensor:
        inputs_embeds = self.language_model.get_input_embeddings()(input_ids.clamp(min=0))
        if image_embeds is not None and images_seq_mask is not None and images_seq_mask.any():
            n_slots, n_rows = int(images_seq_mask.sum()), image_embeds.shape[0]
            if n_slots != n_rows:
                raise ValueError(f"the prompt has {n_slots} image-token positions but {n_rows} image embeddings were given")
            inputs_embeds = inputs_embeds.masked_scatter(images_seq_mask.unsqueeze(-1), image_embeds.to(inputs_embeds.dtype))
        return inputs_embeds

    def prepare_inputs_embeds(
        self,
        input_ids: torch.Tensor,  # [B, T]
        pixel_values: torch.Tensor,  # [B, n, 3, S, S]
        images_seq_mask: torch.Tensor,  # [B, T]
        images_emb_mask: torch.Tensor,  # [B, n, 576] True for real image slots
    ) -> torch.Tensor:
        real = images_emb_mask.any(-1)  # [B, n]: padding slots hold all-zero pixels; skip encoding them
        embeds = self.encode_images(pixel_values[real]) if real.any() else None  # [M_img, 576, D]
        rows = embeds[images_emb_mask[real]] if embeds is not None else None  # [M, D]
        return self.embed(input_ids, images_seq_mask, rows)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        images_seq_mask: torch.Tensor | None = None,
        images_emb_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache=None,
        use_cache: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        labels: torch.Tensor | None = None,
    ):
        if inputs_embeds is None:
            if pixel_values is not None and images_seq_mask is not None and images_emb_mask is not None:
                inputs_embeds = self.prepare_inputs_embeds(input_ids, pixel_values, images_seq_mask, images_emb_mask)
            else:
                inputs_embeds = self.embed(input_ids)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            labels=labels,
        )


def build_empty(cfg: VLConfig, dtype: torch.dtype | None = None) -> DeepSeekVL:
    """Build the architecture on the meta device: no memory is allocated, even for the 7B."""
    with torch.device("meta"):
        model = DeepSeekVL(cfg)
    return model.to(dtype) if dtype is not None else model
