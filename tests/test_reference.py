"""Our model against the official DeepSeek-VL code's reference vectors (shared/reference/README.md).

Runs every manifest and every model case found under $DSVL_REFERENCE_DIR (default ../shared/reference).
Processor and prompt-template cases run in test_processing.py.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import REFERENCE_DIR
from engine.generation import Sampler, SamplingParams, decode
from engine.loading import build_model, load_model
from engine.model.config import VLConfig
from engine.model.llama import KVCache
from engine.processing import ImageProcessorConfig

TOLERANCE = 1e-4


def _dirs(pattern):
    found = sorted(REFERENCE_DIR.glob(pattern))
    assert found, f"no {pattern} under {REFERENCE_DIR}"
    return [pytest.param(p, id=p.stem if p.is_file() else p.name) for p in found]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max())


# ------------------------------------------------------------------ manifests
@pytest.mark.parametrize("manifest", _dirs("manifests/*.json"))
def test_state_dict_equals_manifest(manifest):
    data = json.loads(manifest.read_text())
    model = build_model(VLConfig.from_official(data["config"]))
    state = model.state_dict()
    # Built without allocating: every parameter lives on the meta device.
    assert all(p.is_meta for p in model.parameters())
    ours = {k: list(v.shape) for k, v in state.items()}
    assert set(ours) == set(data["parameters"]), (
        f"missing {sorted(set(data['parameters']) - set(ours))[:5]}, extra {sorted(set(ours) - set(data['parameters']))[:5]}"
    )
    assert ours == {k: list(v) for k, v in data["parameters"].items()}
    assert sum(v.numel() for v in state.values()) == data["total_parameters"]


# ------------------------------------------------------------------ model cases
class Case:
    def __init__(self, directory):
        self.directory = directory
        self.tensors = load_file(directory / "case.safetensors")
        self.meta = json.loads((directory / "case.json").read_text())
        self.loaded = load_model(directory)
        self.model = self.loaded.model

    @property
    def pixel_values(self) -> torch.Tensor:
        """[B, n, 3, S, S] as the model takes them: /255, then normalised when the processor normalises."""
        proc = ImageProcessorConfig.from_pretrained(self.directory)
        pixels = self.tensors["pixel_uint8"].float() / 255
        if proc.do_normalize:
            mean = torch.tensor(proc.image_mean).view(1, 1, 3, 1, 1)
            std = torch.tensor(proc.image_std).view(1, 1, 3, 1, 1)
            pixels = (pixels - mean) / std
        return pixels

    @property
    def real_slots(self) -> torch.Tensor:  # [B, n]
        return self.tensors["images_emb_mask"].any(-1)


@pytest.fixture(scope="module", params=_dirs("models/*"))
def case(request):
    return Case(request.param)


@torch.no_grad()
def test_vision_features(case):
    t = case.tensors
    features = case.model.vision_model(case.pixel_values[case.real_slots])
    flat = case.real_slots.flatten()
    if isinstance(features, tuple):
        assert relative_error(features[0], t["expected_vision_high"][flat]) < TOLERANCE
        assert relative_error(features[1], t["expected_vision_low"][flat]) < TOLERANCE
    else:
        assert relative_error(features, t["expected_vision"][flat]) < TOLERANCE


@torch.no_grad()
def test_image_embeddings(case):
    embeds = case.model.encode_images(case.pixel_values[case.real_slots])
    expected = case.tensors["expected_image_embeds"][case.real_slots.flatten()]
    assert embeds.shape == expected.shape
    assert relative_error(embeds, expected) < TOLERANCE


@torch.no_grad()
def test_logits_left_padded_batch(case):
    t = case.tensors
    mask = t["attention_mask"]
    out = case.model(
        input_ids=t["input_ids"],
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        pixel_values=case.pixel_values,
        images_seq_mask=t["images_seq_mask"],
        images_emb_mask=t["images_emb_mask"],
    )
    valid = t["logit_valid"]
    logits = out.logits[:, t["logit_positions"]]
    assert relative_error(logits[valid], t["expected_logits"][valid]) < TOLERANCE


@torch.no_grad()
def test_greedy_tokens(case):
    t = case.tensors
    expected = t["expected_greedy_tokens"]
    for i in range(expected.shape[0]):
        keep = t["attention_mask"][i].bool()
        ids = t["input_ids"][i][keep][None]
        real = case.real_slots[i]
        embeds = case.model.prepare_inputs_embeds(
            ids, case.pixel_values[i][real][None], t["images_seq_mask"][i][keep][None], t["images_emb_mask"][i][real][None]
        )
        cache = KVCache()
        out = case.model(input_ids=ids, inputs_embeds=embeds, cache=cache, use_cache=True)
        sampler = Sampler(SamplingParams(temperature=0.0, max_new_tokens=expected.shape[1]))
        tokens = list(decode(case.model, cache, out.logits[0, -1], sampler))
        assert tokens == expected[i].tolist()
