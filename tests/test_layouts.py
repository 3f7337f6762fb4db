"""The deepseek-community checkpoint layout (transformers' DeepseekVL / DeepseekVLHybrid classes).

Every reference model is saved in the community layout and must load back through our loader unchanged; the same
files are loaded with transformers' own classes and compared with the reference vectors (the official code's
output, which wins where transformers differs: each difference found is measured and explained here).
"""

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from engine import layouts
from engine.loading import LoadError, build_model, load_model
from engine.model.config import OFFICIAL_1_3B, OFFICIAL_7B, ConfigError, VLConfig

REPO = Path(__file__).resolve().parents[1]
REF = Path(os.environ.get("DSVL_REFERENCE_DIR") or REPO.parent / "shared" / "reference")
TOL = 1e-4  # the reference README's float32 tolerance (max |diff| / max |expected|)

CASES = sorted(p.name for p in (REF / "models").iterdir() if (p / "config.json").is_file()) if (REF / "models").is_dir() else []
pytestmark = pytest.mark.skipif(not CASES, reason=f"no reference models under {REF / 'models'}")
# Cases whose SAM downsample convs have widths other than transformers' fixed 2×/4× of the neck.
ODD_SAM_CASES = [c for c in CASES if "downsample_channels" in (REF / "models" / c / "config.json").read_text()]


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# ------------------------------------------------------------------------------------------- fixtures
class Case:
    """A reference model (official layout), its inputs, and our model's outputs on them."""

    def __init__(self, name: str):
        self.name = name
        self.dir = REF / "models" / name
        self.loaded = load_model(self.dir)
        self.model = self.loaded.model
        self.cfg = self.loaded.config
        self.t = load_file(self.dir / "case.safetensors")
        self.meta = json.loads((self.dir / "case.json").read_text())
        self.image_token_id = int(self.meta.get("image_token_id", 100015))
        self.real = self.t["images_emb_mask"].any(-1)  # [B, n]: slots holding an image (the rest pad the batch)
        self.position_ids = (self.t["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        self.valid = self.t["logit_valid"]
        self.pixels = self._pixels()
        self.outputs = self.run(self.model)

    def _pixels(self) -> torch.Tensor:
        """What our model takes: the processor normalises for a plain SigLIP tower; the hybrid normalises inside."""
        pre = json.loads((self.dir / "preprocessor_config.json").read_text())
        x = self.t["pixel_uint8"].float() / 255
        if pre.get("do_normalize"):
            x = (x - torch.tensor(pre["image_mean"]).view(1, 1, 3, 1, 1)) / torch.tensor(pre["image_std"]).view(1, 1, 3, 1, 1)
        return x

    def run(self, model) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            vision = model.vision_model(self.pixels[self.real])
            out = {"image_embeds": model.aligner(vision)}
            if isinstance(vision, tuple):
                out["vision_high"], out["vision_low"] = vision
            else:
                out["vision"] = vision
            logits = model(
                input_ids=self.t["input_ids"], attention_mask=self.t["attention_mask"], position_ids=self.position_ids,
                pixel_values=self.pixels, images_seq_mask=self.t["images_seq_mask"], images_emb_mask=self.t["images_emb_mask"],
            ).logits
        out["logits"] = logits[:, self.t["logit_positions"]]
        return out

    def expected(self, name: str) -> torch.Tensor:
        """Reference vectors for real image slots only (`expected_vision*` may include the padding slots)."""
        value = self.t[f"expected_{name}"]
        if name == "logits":
            return value
        return value[self.real.reshape(-1)] if value.shape[0] == self.real.numel() else value

    def save_community(self, directory: Path, **kwargs) -> tuple[dict, dict]:
        config, state = layouts.to_community(self.model, image_token_id=self.image_token_id, **kwargs)
        write(directory, config, state)
        return config, state


def write(directory: Path, config: dict, state: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors")
    return directory


_CACHE: dict[str, Case] = {}


def load_case(name: str) -> Case:
    if name not in _CACHE:
        _CACHE[name] = Case(name)
    return _CACHE[name]


@pytest.fixture(params=CASES)
def case(request) -> Case:
    return load_case(request.param)


def test_our_model_matches_the_reference(case):
    # The baseline every comparison below rests on.
    for name, value in case.outputs.items():
        if name == "logits":
            assert rel(value[case.valid], case.expected("logits")[case.valid]) < TOL
        else:
            assert rel(value, case.expected(name)) < TOL, name


# ------------------------------------------------------------------------------------------- our loader
@pytest.mark.parametrize("head", [False, True], ids=["no-head", "with-head"])
def test_community_roundtrip_is_exact(case, tmp_path, head):
    config, state = case.save_community(tmp_path, vision_use_head=head)
    assert "vision_model.vision_tower.blocks.0.attn.qkv.weight" not in state  # really the other layout
    loaded = load_model(tmp_path)
    assert loaded.layout == "community"

    ours, back = case.model.state_dict(), loaded.model.state_dict()
    assert ours.keys() == back.keys()
    filled = {k for k in ours if not torch.equal(ours[k], back[k])}
    # Only what the community file does not hold, and the official forward never uses, differs: it is neutral.
    unused = {k for k in ours if ".attn_pool." in k and not head} | {k for k in ours if "_layer_norm." in k}
    assert filled <= unused
    for k in unused:
        assert torch.equal(back[k], layouts.neutral(k, tuple(back[k].shape)))

    again = case.run(loaded.model)
    for name, value in case.outputs.items():
        assert torch.equal(again[name], value), name


def test_transformers4_nested_siglip_prefix_loads(case, tmp_path):
    # transformers 4 (which made the hub's deepseek-community files) nested SigLIP one level deeper.
    _, state = case.save_community(tmp_path)
    nested = {("model.vision_model.vision_model." + k[len("model.vision_model."):] if k.startswith("model.vision_model.") else k): v
              for k, v in state.items()}
    save_file(nested, tmp_path / "model.safetensors")
    loaded = load_model(tmp_path)
    assert torch.equal(case.run(loaded.model)["logits"], case.outputs["logits"])


def test_community_config_maps_back_to_the_official_one(case):
    config, _ = layouts.to_community(case.model, image_token_id=case.image_token_id)
    official = layouts.community_to_official(config)
    back = VLConfig.from_official(official)
    assert back.vision == case.cfg.vision
    assert back.aligner == case.cfg.aligner
    lang = {k: v for k, v in case.cfg.language.to_dict().items() if k not in ("architectures", "transformers_version")}
    assert {k: v for k, v in back.language.to_dict().items() if k in lang} == lang


# ------------------------------------------------------------------------------------------- transformers
def transformers_class(config: dict):
    from transformers import DeepseekVLForConditionalGeneration, DeepseekVLHybridForConditionalGeneration

    return DeepseekVLHybridForConditionalGeneration if config["model_type"] == "deepseek_vl_hybrid" else DeepseekVLForConditionalGeneration


def transformers_compatible(config: dict, state: dict) -> tuple[dict, dict]:
    """The same function in a shape transformers can build.

    transformers' SAM projection is fixed at 2× and 4× the neck width, while the official builder (and the reference
    hybrid, through its size-override keys) may use any widths: such a checkpoint carries our `downsample_channels`
    extension and transformers refuses it (see `test_transformers_refuses_other_downsample_widths`). To still compare
    transformers with the reference, the small convs are embedded in the fixed-width ones with zeros: extra output
    channels of conv1 are 0 and conv2 ignores them, extra outputs of conv2 are 0 and the aligner's high-res
    projection ignores them. Bilinear interpolation is per channel and neither conv has a bias, so the computation is
    exactly the reference's, with zero channels appended to the high-res features.
    """
    sam = config.get("high_res_vision_config", {})
    if "downsample_channels" not in sam:
        return config, state
    config, state = json.loads(json.dumps(config)), dict(state)
    d1, d2 = config["high_res_vision_config"].pop("downsample_channels")
    neck = sam["output_channels"]
    conv1, conv2 = state["model.high_res_vision_proj.conv1.weight"], state["model.high_res_vision_proj.conv2.weight"]
    proj = state["model.aligner.high_res_vision_proj.weight"]
    w1 = torch.zeros(2 * neck, neck, 3, 3)
    w1[:d1] = conv1
    w2 = torch.zeros(4 * neck, 2 * neck, 3, 3)
    w2[:d2, :d1] = conv2
    p = torch.zeros(proj.shape[0], 4 * neck)
    p[:, :d2] = proj
    state.update({"model.high_res_vision_proj.conv1.weight": w1, "model.high_res_vision_proj.conv2.weight": w2,
                  "model.aligner.high_res_vision_proj.weight": p})
    return config, state


def load_transformers(case: Case, directory: Path, **kwargs):
    config, state = transformers_compatible(*layouts.to_community(case.model, image_token_id=case.image_token_id, **kwargs))
    write(directory, config, state)
    return transformers_class(config).from_pretrained(directory).eval()


def exact_inputs(case: Case) -> dict[str, torch.Tensor]:
    """The official towers' inputs, normalised outside the model as transformers expects.

    The hybrid gets its 1024² view normalised with SAM's statistics and the official 384² view (antialiased bilinear
    resize of the [0, 1] float image, as the official tower does) normalised with SigLIP's."""
    x = case.pixels[case.real]
    if not case.cfg.vision.hybrid:
        return {"pixel_values": x}
    tower = case.model.vision_model
    high, low = tower.vision_tower_high, tower.vision_tower_low
    return {"pixel_values": (tower.low_res_view(x) - low.pixel_mean) / low.pixel_std,
            "high_res_pixel_values": (x - high.pixel_mean) / high.pixel_std}


def transformers_outputs(case: Case, hf, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        features = hf.model.get_image_features(**inputs)
        logits = hf(input_ids=case.t["input_ids"], attention_mask=case.t["attention_mask"], position_ids=case.position_ids, **inputs).logits
    out = {"image_embeds": features.pooler_output, "logits": logits[:, case.t["logit_positions"]]}
    if case.cfg.vision.hybrid:
        out["vision_low"] = features.last_hidden_state
        high = features.high_res_vision_last_hidden_state
        width = case.outputs["vision_high"].shape[-1]
        if high.shape[-1] > width:  # the zero-padded embedding of `transformers_compatible`
            assert high[..., width:].abs().max().item() == 0
        out["vision_high"] = high[..., :width]
    else:
        out["vision"] = features.last_hidden_state
    return out


def errors(case: Case, got: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: rel(value[case.valid], case.expected(name)[case.valid]) if name == "logits" else rel(value, case.expected(name))
            for name, value in got.items()}


def test_transformers_matches_the_reference_given_the_official_inputs(case, tmp_path):
    hf = load_transformers(case, tmp_path, vision_use_head=True)
    # Not a source of difference: every LayerNorm transformers builds here uses eps 1e-6, as the official towers;
    # the towers' GELU is exact because the community config names "gelu" (see the activation test below); and
    # transformers keeps our separate lm_head because the config says tie_word_embeddings=false.
    eps = {m.eps for m in hf.modules() if isinstance(m, nn.LayerNorm)}
    assert eps == {1e-6}
    assert hf.lm_head.weight.data_ptr() != hf.model.language_model.embed_tokens.weight.data_ptr()

    inputs = exact_inputs(case)
    for name, err in errors(case, transformers_outputs(case, hf, inputs)).items():
        assert err < TOL, (name, err)

    # The SigLIP pooling head (unused by DeepSeek-VL) maps too: ours `q` + `kv` are transformers' `in_proj`.
    siglip = hf.model.vision_model
    tower = case.model.vision_model.vision_tower_low if case.cfg.vision.hybrid else case.model.vision_model
    with torch.no_grad():
        theirs = siglip(inputs["pixel_values"]).pooler_output
        ours = tower.vision_tower.pooled(inputs["pixel_values"])
    assert rel(ours, theirs) < TOL


@pytest.mark.parametrize("name", ODD_SAM_CASES)
def test_transformers_refuses_other_downsample_widths(name, tmp_path):
    case = load_case(name)
    config, _ = case.save_community(tmp_path)
    assert "downsample_channels" in config["high_res_vision_config"]
    # Our loader reads the extension key; transformers ignores it, builds 2×/4× convs and rejects the shapes
    # rather than computing something else.
    assert load_model(tmp_path).layout == "community"
    with pytest.raises(RuntimeError, match="mismatch"):
        transformers_class(config).from_pretrained(tmp_path)


def test_transformers_processor_views(case, tmp_path):
    """How transformers' image processors build the model inputs, against the official processor and tower.

    For the same padded square (`pixel_uint8`), the 1024² (hybrid) or 384² (SigLIP-only) view is the same up to
    float rounding. The hybrid's 384² SigLIP view is where they differ: the official tower resizes the [0, 1] float
    tensor inside the model (torchvision antialiased bilinear, no rounding), while transformers' processor resizes
    the padded uint8 image with PIL (BILINEAR in the deepseek-community preprocessor config, BICUBIC by the class
    default) and keeps the result as uint8, so the view is rounded to 1/255 and, with BICUBIC, filtered differently.
    The outputs then differ from the reference beyond its 1e-4 tolerance; measured on the reference hybrid:
    BILINEAR ≈ 5e-3 on image embeddings / 2e-3 on logits, BICUBIC ≈ 5e-2 / 8e-3.
    """
    from transformers.image_utils import PILImageResampling
    from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil
    from transformers.models.deepseek_vl_hybrid.image_processing_pil_deepseek_vl_hybrid import DeepseekVLHybridImageProcessorPil

    squares = list(case.t["pixel_uint8"][case.real])  # uint8 CHW
    exact = exact_inputs(case)
    if not case.cfg.vision.hybrid:
        pre = json.loads((case.dir / "preprocessor_config.json").read_text())
        proc = DeepseekVLImageProcessorPil(image_mean=pre["image_mean"], image_std=pre["image_std"], size={"height": 384, "width": 384})
        got = proc(images=squares, return_tensors="pt")["pixel_values"]
        assert (got - exact["pixel_values"]).abs().max().item() < 1e-5
        return

    low, high = case.model.vision_model.vision_tower_low, case.model.vision_model.vision_tower_high
    hf = load_transformers(case, tmp_path)
    measured = {}
    for resample in (PILImageResampling.BILINEAR, PILImageResampling.BICUBIC):
        proc = DeepseekVLHybridImageProcessorPil(
            image_mean=low.pixel_mean.flatten().tolist(), image_std=low.pixel_std.flatten().tolist(),
            high_res_image_mean=high.pixel_mean.flatten().tolist(), high_res_image_std=high.pixel_std.flatten().tolist(),
            resample=resample,
        )
        got = proc(images=squares, return_tensors="pt")
        assert (got["high_res_pixel_values"] - exact["high_res_pixel_values"]).abs().max().item() < 1e-5
        view = got["pixel_values"] * low.pixel_std + low.pixel_mean  # back to [0, 1]
        assert ((view * 255) - (view * 255).round()).abs().max().item() < 1e-3  # on the uint8 grid
        measured[resample.name] = errors(case, transformers_outputs(case, hf, dict(got)))
    bilinear, bicubic = measured["BILINEAR"], measured["BICUBIC"]
    # Systematic, not noise: above the reference tolerance, but small, and larger for the other filter.
    assert TOL < bilinear["image_embeds"] < 2e-2 and bilinear["logits"] < 1e-2, bilinear
    assert bicubic["image_embeds"] > bilinear["image_embeds"] and bicubic["image_embeds"] < 2e-1, bicubic
    # The SAM path sees the same 1024² input, so it stays exact.
    assert bilinear["vision_high"] < TOL and bicubic["vision_high"] < TOL


def test_transformers_processor_reproduces_the_official_squares(case):
    """From the source images, transformers' processor makes the same padded squares as the official one here.

    It is not identical in general: it sizes the resized side with round() where the official code floors (int()),
    so some aspect ratios come out one pixel larger; with these images both agree (within the README's allowance for
    Pillow's bicubic across versions)."""
    from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil
    from transformers.models.deepseek_vl_hybrid.image_processing_pil_deepseek_vl_hybrid import DeepseekVLHybridImageProcessorPil

    size = case.cfg.vision.input_size
    pre = json.loads((case.dir / "preprocessor_config.json").read_text())
    common = dict(do_normalize=False, do_rescale=False, image_mean=pre.get("image_mean"), image_std=pre.get("image_std"))
    if case.cfg.vision.hybrid:
        proc, key = DeepseekVLHybridImageProcessorPil(**common, high_res_image_mean=pre.get("image_mean")), "high_res_pixel_values"
    else:
        proc, key = DeepseekVLImageProcessorPil(**common, size={"height": size, "width": size}), "pixel_values"
    images = [Image.open(REF / p).convert("RGB") for sample in case.meta["images"] for p in sample]
    got = proc(images=images, return_tensors="pt")[key]
    diff = (got - case.t["pixel_uint8"][case.real].float()).abs()
    assert diff.max().item() <= 8 and diff.mean().item() <= 0.2


def test_transformers_defaults_that_break_the_official_model(case, tmp_path):
    """Two transformers defaults a community config.json must override, measured on the reference case.

    - SigLIP `hidden_act` defaults to "gelu_pytorch_tanh" (tanh-approximated GELU); the official towers (timm) use
      exact GELU. A config that omits it makes transformers drift by a few 1e-4 relative, beyond the tolerance.
    - DeepseekVL configs default to tie_word_embeddings=true. If the file holds lm_head.weight, transformers notices
      it differs from the embeddings and does not tie (a warning), so logits still match; if the file has no
      lm_head (saved tied), transformers silently uses the input embeddings as output head and the logits are
      wrong, while our loader refuses such a checkpoint.
    """
    config, state = transformers_compatible(*layouts.to_community(case.model, image_token_id=case.image_token_id))
    inputs = exact_inputs(case)

    tanh = json.loads(json.dumps(config))
    del tanh["vision_config"]["hidden_act"]
    hf = transformers_class(config).from_pretrained(write(tmp_path / "tanh", tanh, state)).eval()
    assert hf.config.vision_config.hidden_act == "gelu_pytorch_tanh"
    err = errors(case, transformers_outputs(case, hf, inputs))
    vision = err["vision_low"] if case.cfg.vision.hybrid else err["vision"]
    assert 1e-5 < vision < 1e-2 and err["image_embeds"] > 1e-5, err

    untied = json.loads(json.dumps(config))
    del untied["tie_word_embeddings"], untied["text_config"]["tie_word_embeddings"]
    hf = transformers_class(config).from_pretrained(write(tmp_path / "default-tie", untied, state)).eval()
    assert hf.config.tie_word_embeddings is True
    assert errors(case, transformers_outputs(case, hf, inputs))["logits"] < TOL  # both tensors present: not tied

    headless = {k: v for k, v in state.items() if k != "lm_head.weight"}
    hf = transformers_class(config).from_pretrained(write(tmp_path / "tied", untied, headless)).eval()
    assert errors(case, transformers_outputs(case, hf, inputs))["logits"] > 0.1
    ours, ours_state = layouts.to_community(case.model, image_token_id=case.image_token_id)
    del ours["tie_word_embeddings"], ours_state["lm_head.weight"]
    with pytest.raises(LoadError, match="no lm_head.weight.*tied word embeddings"):
        load_model(write(tmp_path / "ours-tied", ours, ours_state))


# ------------------------------------------------------------------------------------------- full-size configs
# The deepseek-community config.json contents for the chat models, as transformers' conversion builds them
# (sizes beyond these are transformers' defaults).
COMMUNITY_1_3B = {
    "model_type": "deepseek_vl",
    "text_config": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "max_position_embeddings": 16384,
                    "num_attention_heads": 16, "num_hidden_layers": 24, "vocab_size": 102400},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "image_size": 384,
                      "patch_size": 16, "hidden_act": "gelu", "vision_use_head": False, "num_attention_heads": 16, "num_hidden_layers": 24},
}
COMMUNITY_7B = {
    "model_type": "deepseek_vl_hybrid",
    "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "max_position_embeddings": 16384,
                    "num_attention_heads": 32, "num_hidden_layers": 30, "vocab_size": 102400},
    "vision_config": dict(COMMUNITY_1_3B["vision_config"]),
    "high_res_vision_config": {"model_type": "sam_vision_model", "hidden_size": 768, "image_size": 1024, "patch_size": 16,
                               "num_attention_heads": 12, "num_hidden_layers": 12},
}


@pytest.mark.parametrize("community, official, manifest", [
    (COMMUNITY_1_3B, OFFICIAL_1_3B, "deepseek-vl-1.3b-chat.json"),
    (COMMUNITY_7B, OFFICIAL_7B, "deepseek-vl-7b-chat.json"),
], ids=["1.3b", "7b"])
def test_full_size_community_configs_map_to_the_official_checkpoints(community, official, manifest):
    from transformers import AutoConfig

    mapped = layouts.community_to_official(community)
    # The official table sizes: no size-override keys, the official model names.
    params = mapped["vision_config"]["params"]
    towers = [params["high_res_cfg"], params["low_res_cfg"]] if "high_res_cfg" in params else [params]
    assert all(not set(t) & {"width", "layers", "heads", "mlp_ratio", "patch_size", "downsample_channels"} for t in towers)
    cfg, expected_cfg = VLConfig.from_official(mapped), VLConfig.from_official(official)
    assert cfg.vision == expected_cfg.vision and cfg.aligner == expected_cfg.aligner

    # The model built from it has exactly the official checkpoint's keys and shapes (meta device: no memory).
    model = build_model(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    path = REF / "manifests" / manifest
    if path.is_file():
        assert ours == {k: tuple(v) for k, v in json.loads(path.read_text())["parameters"].items()}

    # And transformers' model for that config maps onto it key for key, shape for shape.
    config = json.loads(json.dumps(community))
    config["tie_word_embeddings"] = False
    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        hf = transformers_class(config)(hf_config)
    checkpoint = {k: (None, tuple(v.shape)) for k, v in hf.state_dict().items()}
    entries = layouts.remap(checkpoint, "community", ours)
    assert set(entries) == set(ours)
    assert {k: tuple(s) for k, (_, s) in entries.items()} == ours


# ------------------------------------------------------------------------------------------- errors
def test_unknown_vision_model_type_is_a_clear_error(tmp_path):
    config = json.loads(json.dumps(COMMUNITY_1_3B))
    config["vision_config"]["model_type"] = "clip_vision_model"
    with pytest.raises(ConfigError, match="clip_vision_model.*siglip_vision_model"):
        layouts.official_config(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(LoadError, match="vision_config.model_type is 'clip_vision_model'"):
        load_model(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["high_res_vision_config"].update(model_type="vit_det"), "high_res_vision_config.model_type is 'vit_det'"),
    (lambda c: c["text_config"].update(model_type="mistral"), "text_config.model_type is 'mistral'"),
    (lambda c: c["vision_config"].update(image_size=448), "grid 28×28"),
    (lambda c: c["vision_config"].update(hidden_act="relu"), "hidden_act 'relu'"),
    (lambda c: c["high_res_vision_config"].update(window_size=16), "window_size 16"),
    (lambda c: c["high_res_vision_config"].update(output_channels=128), r"SAM features \(512\) and SigLIP features \(1024\)"),
    (lambda c: c.pop("vision_config"), "no 'vision_config' section"),
], ids=["sam-type", "text-type", "grid", "activation", "window", "widths", "no-vision"])
def test_unmappable_community_configs(edit, message):
    config = json.loads(json.dumps(COMMUNITY_7B))
    edit(config)
    with pytest.raises(ConfigError, match=message):
        layouts.community_to_official(config)


def test_single_tower_config_with_a_sam_section_is_rejected():
    config = {**json.loads(json.dumps(COMMUNITY_1_3B)), "high_res_vision_config": COMMUNITY_7B["high_res_vision_config"]}
    with pytest.raises(ConfigError, match="deepseek_vl_hybrid"):
        layouts.community_to_official(config)


def test_incomplete_community_checkpoints_are_reported(tmp_path):
    case = _CACHE.get(CASES[0]) or Case(CASES[0])
    config, state = case.save_community(tmp_path, vision_use_head=True)
    broken = {k: v for k, v in state.items() if not k.endswith("layers.0.self_attn.k_proj.weight") and k != "model.vision_model.head.probe"}
    save_file(broken, tmp_path / "model.safetensors")
    with pytest.raises(LoadError) as info:
        load_model(tmp_path)
    message = str(info.value)
    # The fused tensor cannot be built (and its leftover parts are named); a partial head is not filled.
    assert "community layout" in message and "blocks.0.attn.qkv.weight" in message and "attn_pool.latent" in message
    assert "layers.0.self_attn.q_proj.weight" in message


def test_aligners_transformers_cannot_express_are_refused():
    raw = json.loads(json.dumps(OFFICIAL_1_3B))
    raw["aligner_config"]["params"]["depth"] = 3
    with pytest.raises(ConfigError, match="Linear → GELU → Linear"):
        layouts.to_community(build_model(VLConfig.from_official(raw)))
