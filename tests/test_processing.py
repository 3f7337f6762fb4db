import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from engine.processing import (
    BOS_TOKEN,
    DEEPSEEK,
    DEFAULT_SYSTEM_PROMPT,
    EOS_TOKEN,
    IMAGE_TOKEN,
    ImageError,
    ImageProcessor,
    ImageProcessorConfig,
    VLChatProcessor,
    build_byte_level_tokenizer,
    build_prompt,
    load_image,
)

REPO = Path(__file__).resolve().parents[1]
REF = Path(os.environ.get("DSVL_REFERENCE_DIR") or REPO.parent / "shared" / "reference")


def _cases(sub):
    path = REF / sub / "cases.json"
    if not path.exists():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no {path}"))]
    cases = json.loads(path.read_text(encoding="utf-8"))["cases"]
    return [pytest.param(c, id=f"{i}-{Path(c.get('image', 'prompt')).stem}") for i, c in enumerate(cases)]


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- reference vectors


@pytest.mark.parametrize("case", _cases("processor"))
def test_processor_reference(case):
    cfg = ImageProcessorConfig.from_dict(case["processor"])
    proc = ImageProcessor(cfg)
    src = load_image(REF / case["image"])
    got = np.asarray(proc.square(src))
    exp = np.asarray(Image.open(REF / case["expected_square_uint8"]).convert("RGB"))
    assert got.shape == exp.shape == (cfg.image_size, cfg.image_size, 3)

    # Geometry and padding colour must be exact: outside the centred resized region both images
    # hold nothing but the background colour.
    w, h = src.size
    m = max(w, h)
    rh = max(int(h / m * cfg.image_size), cfg.min_size)
    rw = max(int(w / m * cfg.image_size), cfg.min_size)
    top, left = (cfg.image_size - rh) // 2, (cfg.image_size - rw) // 2
    pad = np.ones((cfg.image_size, cfg.image_size), bool)
    pad[top : top + rh, left : left + rw] = False
    bg = np.array(cfg.background_color, np.uint8)
    if pad.any():
        assert (exp[pad] == bg).all() and (got[pad] == bg).all()

    diff = np.abs(got.astype(int) - exp.astype(int))
    if int(PIL.__version__.split(".")[0]) >= 13:
        assert diff.max() == 0
    assert diff.max() <= 8 and diff.mean() <= 0.2

    pv = proc([src])
    assert pv.shape == (1, 3, cfg.image_size, cfg.image_size) and pv.dtype == torch.float32
    # Exact arithmetic on the expected square gives the reference sums.
    ref_pv = proc.to_tensor(Image.fromarray(exp)).double()
    sums = {"expected_pixel_values_sum": ref_pv.sum(), "expected_pixel_values_abs_sum": ref_pv.abs().sum()}
    for key, val in sums.items():
        if key in case:
            assert float(val) == pytest.approx(case[key], rel=1e-5, abs=1e-2)
    if "expected_pixel_values_sum" in case:
        assert float(pv.double().sum()) == pytest.approx(case["expected_pixel_values_sum"], rel=1e-3, abs=1.0)


@pytest.mark.parametrize("case", _cases("prompts"))
def test_prompt_reference(case):
    assert build_prompt(case["messages"], case["system_prompt"]) == case["expected_prompt"]


def test_template_constants():
    assert DEEPSEEK.roles == ("User", "Assistant")
    assert DEEPSEEK.sep == "\n\n" and DEEPSEEK.sep2 == EOS_TOKEN
    assert DEEPSEEK.stop_str == ("User:", EOS_TOKEN)
    assert build_prompt([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}], "") == (
        "User: hi\n\nAssistant:"
    )
    with pytest.raises(ValueError):
        build_prompt([{"role": "system", "content": "x"}], "")


# --------------------------------------------------------------------------- config


def test_config_from_pretrained(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_size": 384, "image_mean": None, "image_std": None, "do_normalize": False, "extra": 1})
    )
    cfg = ImageProcessorConfig.from_pretrained(tmp_path)
    assert cfg.image_size == 384 and cfg.min_size == 14 and cfg.background_color == (127, 127, 127)
    assert ImageProcessorConfig(1024).background_color == (122, 116, 104)
    with pytest.raises(ValueError):
        ImageProcessorConfig(384, image_mean=None, do_normalize=True)


# --------------------------------------------------------------------------- image loading edge cases


def test_load_sources(tmp_path):
    img = Image.new("RGB", (5, 3), (10, 20, 30))
    p = tmp_path / "a.png"
    img.save(p)
    for src in (p, str(p), p.read_bytes(), io.BytesIO(p.read_bytes()), img):
        out = load_image(src)
        assert out.mode == "RGB" and out.size == (5, 3) and out.getpixel((0, 0)) == (10, 20, 30)


def test_modes():
    rgba = load_image(Image.new("RGBA", (4, 4), (200, 100, 50, 0)))
    assert rgba.getpixel((0, 0)) == (200, 100, 50)  # alpha dropped, not composited
    assert load_image(Image.new("L", (2, 2), 77)).getpixel((1, 1)) == (77, 77, 77)
    cmyk = load_image(_jpeg_cmyk())
    assert cmyk.mode == "RGB" and cmyk.size == (8, 8)
    pal = Image.new("P", (3, 3), 1)
    pal.putpalette([0, 0, 0, 9, 8, 7] + [0] * 762)
    pal.info["transparency"] = 0
    assert load_image(_png(pal)).getpixel((0, 0)) == (9, 8, 7)


def _jpeg_cmyk():
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def test_16bit_gray_scaled_not_clipped():
    arr = np.array([[0, 257 * 128], [65535, 257]], dtype=np.uint16)
    img16 = Image.fromarray(arr)  # mode I;16
    out = load_image(_png(img16))
    vals = [out.getpixel(xy)[0] for xy in ((0, 0), (1, 0), (0, 1), (1, 1))]
    assert vals == [0, 128, 255, 1]
    out_i = load_image(Image.fromarray(arr.astype(np.int32)))  # mode I
    assert out_i.getpixel((1, 0)) == (128, 128, 128)


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (6, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    out = load_image(buf.getvalue())
    assert out.size == (6, 4) and out.getpixel((0, 0)) == (255, 0, 0)


def test_extreme_sizes():
    proc = ImageProcessor(ImageProcessorConfig(384, image_mean=(0.5,) * 3, image_std=(0.5,) * 3))
    one = proc.square(load_image(Image.new("RGB", (1, 1), (255, 255, 255))))
    assert one.size == (384, 384)
    wide = proc.square(load_image(Image.new("RGB", (30000, 10), (0, 0, 0))))
    a = np.asarray(wide)
    # 14 rows (min_size) of image centred vertically, the rest background.
    assert wide.size == (384, 384)
    assert (a[185:199] == 0).all() and (a[:185] == 127).all() and (a[199:] == 127).all()
    tall = np.asarray(proc.square(Image.new("RGB", (10, 30000), (0, 0, 0))))
    assert (tall[:, 185:199] == 0).all() and (tall[:, :185] == 127).all()
    assert proc([Image.new("RGB", (30000, 10))]).shape == (1, 3, 384, 384)


def test_errors(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    fake = tmp_path / "fake.png"
    fake.write_text("hello, not an image")
    with pytest.raises(ImageError, match="not an image"):
        load_image(fake)
    data = _png(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(ImageError, match="truncated"):
        load_image(data[: len(data) // 2])
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)
    assert issubclass(ImageError, ValueError)


def _png_header(width, height):
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb():
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(_png_header(100_000, 100_000))  # beyond PIL's own limit too
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(_png_header(9000, 9000))  # 81 MP: above ours, below PIL's
    with pytest.raises(ImageError, match="too large"):
        load_image(_png(Image.new("RGB", (100, 100))), max_pixels=1000)


# --------------------------------------------------------------------------- tokenizer and chat processor

CORPUS = [
    "You are a helpful language and vision assistant.",
    "User: Describe each stage of this image.\n\nAssistant: A chart.",
    "Which is brighter? Figure 1 is brighter than Figure 2.",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_byte_level_tokenizer(CORPUS, 400, d)
    (d / "preprocessor_config.json").write_text(
        json.dumps({"image_size": 32, "min_size": 14, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "do_normalize": True})
    )
    return d


@pytest.fixture(scope="module")
def vlp(model_dir):
    return VLChatProcessor.from_pretrained(model_dir, num_image_tokens=5)


def test_tokenizer_round_trip(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.bos_token == BOS_TOKEN and tok.eos_token == EOS_TOKEN
    img_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    ids = tok.encode(f"User: {IMAGE_TOKEN}héllo wörld")
    assert ids[0] == tok.bos_token_id and ids.count(img_id) == 1
    assert tok.encode(IMAGE_TOKEN, add_special_tokens=False) == [img_id]
    assert tok.decode(ids, skip_special_tokens=True) == "User: héllo wörld"


def _conv(text):
    return [{"role": "User", "content": text}, {"role": "Assistant", "content": ""}]


def test_process(vlp):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    p = vlp.process(_conv(f"{IMAGE_TOKEN}What is this?"), [img])
    assert p.prompt.startswith(DEFAULT_SYSTEM_PROMPT)
    ids = p.input_ids
    assert ids.dtype == torch.long and ids[0] == vlp.tokenizer.bos_token_id
    assert p.images_seq_mask.dtype == torch.bool and int(p.images_seq_mask.sum()) == 5
    run = p.images_seq_mask.nonzero().flatten()
    assert (run == torch.arange(run[0], run[0] + 5)).all() and (ids[run] == vlp.image_id).all()
    assert p.pixel_values.shape == (1, 3, 32, 32) and p.num_images == 1
    assert vlp.token_cost(_conv(f"{IMAGE_TOKEN}What is this?")) == len(ids)
    # Unexpanded encoding plus (num_image_tokens - 1) per image.
    plain = vlp.tokenizer.encode(p.prompt)
    assert len(ids) == len(plain) + 4


def test_placeholder_mismatch(vlp):
    img = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="1 <image_placeholder> placeholder.*2 image"):
        vlp.process(_conv(f"{IMAGE_TOKEN}hi"), [img, img])
    with pytest.raises(ValueError, match="2 <image_placeholder>.*0 image"):
        vlp.process(_conv(f"{IMAGE_TOKEN}{IMAGE_TOKEN}hi"), [])


def test_collate(vlp):
    img = Image.new("RGB", (20, 40), (0, 255, 0))
    a = vlp.process(_conv("Hello"), [], system_prompt="")
    b = vlp.process(_conv(f"{IMAGE_TOKEN} is Figure 1.\n{IMAGE_TOKEN} is Figure 2."), [img, img])
    batch = vlp.collate([a, b])
    t = len(b.input_ids)
    assert len(a.input_ids) < t and batch.input_ids.shape == (2, t)
    pad = t - len(a.input_ids)
    assert (batch.input_ids[0, :pad] == vlp.pad_id).all() and vlp.pad_id == vlp.tokenizer.eos_token_id
    assert (batch.input_ids[0, pad:] == a.input_ids).all() and (batch.input_ids[1] == b.input_ids).all()
    assert batch.attention_mask[0].tolist() == [0] * pad + [1] * len(a.input_ids)
    assert batch.position_ids[0].tolist() == [0] * pad + list(range(len(a.input_ids)))
    assert batch.position_ids[1].tolist() == list(range(t))
    assert batch.pixel_values.shape == (2, 2, 3, 32, 32)
    assert (batch.pixel_values[0] == 0).all() and torch.equal(batch.pixel_values[1], b.pixel_values)
    assert batch.images_seq_mask.shape == (2, t) and not batch.images_seq_mask[0].any()
    assert int(batch.images_seq_mask[1].sum()) == 10
    assert batch.images_emb_mask.shape == (2, 2, 5)
    assert not batch.images_emb_mask[0].any() and batch.images_emb_mask[1].all()
    # No images anywhere: still one (zero) image slot, as the official batchify.
    solo = vlp.collate([a])
    assert solo.pixel_values.shape == (1, 1, 3, 32, 32) and solo.images_emb_mask.shape == (1, 1, 5)
    assert batch.to("cpu", torch.float16).pixel_values.dtype == torch.float16
