"""DeepSeek-VL input processing: image loading, square resize, prompt template, tokenisation, batching.

Mirrors the official deepseek-ai/DeepSeek-VL processor (VLMImageProcessor, the ``deepseek``
conversation template and VLChatProcessor), which is the ground truth for every value produced here.
"""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
IMAGE_TOKEN = "<image_placeholder>"
DEFAULT_NUM_IMAGE_TOKENS = 576
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
MAX_PIXELS = 64_000_000

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]


# --------------------------------------------------------------------------- image loading


class ImageError(ValueError):
    """An image could not be used; the message is meant for the user."""


def load_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Load a path, bytes, binary file object or PIL image as a fully decoded RGB image."""
    if isinstance(source, Image.Image):
        return _decode(source, "image", max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("The image data is empty.")
        return _open_and_decode(io.BytesIO(bytes(source)), "image data", max_pixels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = f"'{path.name}'"
        try:
            if path.stat().st_size == 0:
                raise ImageError(f"The image file {name} is empty.")
            with open(path, "rb") as fh:
                return _open_and_decode(fh, f"the file {name}", max_pixels)
        except FileNotFoundError:
            raise ImageError(f"Image file not found: {path}") from None
        except IsADirectoryError:
            raise ImageError(f"{path} is a folder, not an image file.") from None
        except PermissionError:
            raise ImageError(f"No permission to read the image file {path}.") from None
    if hasattr(source, "read"):
        return _open_and_decode(source, "image data", max_pixels)
    raise ImageError(f"Cannot load an image from a {type(source).__name__}.")


def _open_and_decode(fh: BinaryIO, what: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice its limit; any bomb is an error here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fh)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _bomb_error(what, None, max_pixels) from None
    except UnidentifiedImageError:
        raise ImageError(f"{what.capitalize()} is not an image in a supported format.") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageError(f"{what.capitalize()} is not a readable image ({e}).") from None
    with img:
        return _decode(img, what, max_pixels)


def _bomb_error(what: str, size: tuple[int, int] | None, max_pixels: int) -> ImageError:
    dims = f" ({size[0]}x{size[1]})" if size else ""
    return ImageError(
        f"{what.capitalize()} is too large{dims}: more than {max_pixels:,} pixels, "
        "possibly a decompression bomb."
    )


def _decode(img: Image.Image, what: str, max_pixels: int) -> Image.Image:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{what.capitalize()} has zero size ({w}x{h}).")
    # Checked from the header, before any pixel data is decoded.
    if w * h > max_pixels:
        raise _bomb_error(what, (w, h), max_pixels)
    try:
        img.load()  # lazy decoding would hide truncation until later; force it now
        return _to_rgb(img)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageError(f"{what.capitalize()} is corrupt or truncated ({e}).") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB as the official code does (``convert("RGB")``: alpha dropped, gray replicated).

    High bit-depth integer images are scaled to 8 bits first: PIL's conversion would clip them to 255.
    Animated images give their first frame (the one loaded after open).
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img).astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        if img.mode == "I" and lo >= 0 and hi <= 255:
            scaled = a  # 8-bit data stored in 32-bit mode
        elif lo >= 0 and hi <= 65535:
            scaled = a / 257.0
        else:
            scaled = (a - lo) / max(hi - lo, 1.0) * 255.0
        img = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    with warnings.catch_warnings():
        # e.g. "palette images with transparency expressed in bytes": harmless when dropping alpha.
        warnings.simplefilter("ignore", UserWarning)
        return img.convert("RGB")


# --------------------------------------------------------------------------- image processor


@dataclass(frozen=True)
class ImageProcessorConfig:
    image_size: int
    min_size: int = 14
    image_mean: tuple[float, float, float] | None = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] | None = (0.26862954, 0.26130258, 0.27577711)
    do_normalize: bool = True
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(x) for x in value))
        if self.do_normalize and (self.image_mean is None or self.image_std is None):
            raise ValueError("do_normalize needs image_mean and image_std")
        if self.image_size < 1 or self.min_size < 1:
            raise ValueError("image_size and min_size must be positive")

    @property
    def background_color(self) -> tuple[int, int, int]:
        if self.image_mean is None:
            return (127, 127, 127)
        return tuple(int(x * 255) for x in self.image_mean)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageProcessorConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ImageProcessorConfig":
        with open(Path(directory) / "preprocessor_config.json", encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))


class ImageProcessor:
    def __init__(self, config: ImageProcessorConfig):
        self.config = config

    def frame(self, w: int, h: int) -> tuple[int, int, int, int]:
        """Where a w x h image lands in the square: its resized size and its offset (new_w, new_h, x, y)."""
        c = self.config
        m = max(w, h)
        new_h = max(int(h / m * c.image_size), c.min_size)
        new_w = max(int(w / m * c.image_size), c.min_size)
        x, y = (0, (new_w - new_h) // 2) if new_w > new_h else ((new_h - new_w) // 2, 0)
        return new_w, new_h, x, y

    def square(self, img: Image.Image, resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
        """Long side to image_size (bicubic, floors, min_size), then centred padding to a square. (`resample`: the
        demo's pretraining puts label maps through the same geometry with NEAREST.)"""
        c = self.config
        if img.mode != "RGB":
            img = _to_rgb(img)
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageError(f"The image has zero size ({w}x{h}).")
        new_w, new_h, x, y = self.frame(w, h)
        # torchvision's resize of a PIL image is exactly this PIL call.
        img = img.resize((new_w, new_h), resample)
        if new_w == new_h:
            return img
        out = Image.new("RGB", (max(new_w, new_h),) * 2, c.background_color)
        out.paste(img, (x, y))
        return out

    def to_tensor(self, square: Image.Image) -> torch.Tensor:
        c = self.config
        x = torch.from_numpy(np.asarray(square, dtype=np.uint8).copy()).permute(2, 0, 1)
        # Same arithmetic as the official (transformers) rescale: float64 multiply, then float32.
        x = (x.double() * c.rescale_factor).float()
        if c.do_normalize:
            mean = torch.tensor(c.image_mean, dtype=torch.float32).view(3, 1, 1)
            std = torch.tensor(c.image_std, dtype=torch.float32).view(3, 1, 1)
            x = (x - mean) / std
        return x

    def __call__(self, images: Sequence[ImageSource]) -> torch.Tensor:
        s = self.config.image_size
        tensors = [self.to_tensor(self.square(load_image(im))) for im in images]
        return torch.stack(tensors) if tensors else torch.zeros(0, 3, s, s)


# --------------------------------------------------------------------------- prompt template


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    roles: tuple[str, str]
    sep: str
    sep2: str
    system_template: str = "{system_message}"
    stop_str: tuple[str, ...] = ()

    def get_prompt(self, messages: Sequence[tuple[str, str]], system_message: str = "") -> str:
        """The official DeepSeek-style ``get_prompt``; seps alternate by message position."""
        system = self.system_template.format(system_message=system_message)
        ret = system + self.sep if system else ""
        seps = (self.sep, self.sep2)
        for i, (role, msg) in enumerate(messages):
            ret += f"{role}: {msg}{seps[i % 2]}" if msg else f"{role}:"
        return ret


DEEPSEEK = PromptTemplate(
    name="deepseek",
    roles=("User", "Assistant"),
    sep="\n\n",
    sep2=EOS_TOKEN,
    stop_str=("User:", EOS_TOKEN),
)


def _role(role: str, template: PromptTemplate) -> str:
    for name, aliases in zip(template.roles, (("user",), ("assistant",))):
        if role == name or role.lower() in (name.lower(), *aliases):
            return name
    raise ValueError(f"unknown message role {role!r}; expected one of {template.roles}")


def build_prompt(
    messages: Sequence[dict[str, str]],
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    template: PromptTemplate = DEEPSEEK,
) -> str:
    """Prompt text for ``[{"role", "content"}, ...]``; an empty last Assistant message asks for a reply."""
    pairs = [(_role(m["role"], template), (m.get("content") or "").strip()) for m in messages]
    return template.get_prompt(pairs, system_prompt or "").strip()


# --------------------------------------------------------------------------- tokeniser


def build_byte_level_tokenizer(corpus: Iterable[str], vocab_size: int, directory: str | os.PathLike):
    """Train a small byte-level BPE tokenizer with DeepSeek-VL's special tokens and save it.

    Saved as tokenizer.json + tokenizer_config.json so ``AutoTokenizer.from_pretrained`` loads it;
    BOS is prepended by the post-processor, as the official tokenizer does. Returns the loaded tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[IMAGE_TOKEN],
    )
    fast.save_pretrained(str(directory))
    return fast


# --------------------------------------------------------------------------- chat processor


@dataclass
class Prepared:
    """One conversation ready for the model (unbatched)."""

    input_ids: torch.Tensor  # LongTensor [T]
    images_seq_mask: torch.Tensor  # BoolTensor [T], True at image token slots
    pixel_values: torch.Tensor  # [n, 3, S, S]
    num_images: int
    prompt: str = ""


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T], left padded
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    pixel_values: torch.Tensor  # [B, max(1, n_max), 3, S, S], zero padded
    images_seq_mask: torch.Tensor  # [B, T]
    images_emb_mask: torch.Tensor  # [B, max(1, n_max), num_image_tokens]
    prompts: list[str] = field(default_factory=list)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Batch":
        """Move to a device; ``dtype`` applies to pixel_values only."""
        moved = {
            f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "prompts"
        }
        moved["pixel_values"] = moved["pixel_values"].to(dtype=dtype or self.pixel_values.dtype)
        return Batch(**moved, prompts=list(self.prompts))


class VLChatProcessor:
    def __init__(
        self,
        tokenizer,
        image_processor: ImageProcessor,
        image_token: str = IMAGE_TOKEN,
        num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS,
        template: PromptTemplate = DEEPSEEK,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = image_token
        self.num_image_tokens = num_image_tokens
        self.template = template
        self.system_prompt = system_prompt
        if tokenizer.get_vocab().get(image_token) is None:
            # As the official processor: a tokenizer without the tag gets it as a special token.
            tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
        self.image_id = tokenizer.get_vocab()[image_token]

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS, **kwargs
    ) -> "VLChatProcessor":
        from transformers import AutoTokenizer, PretrainedConfig

        # A blank config: the tokenizer class comes from tokenizer_config.json, and AutoTokenizer would
        # otherwise read config.json and warn that it does not know the `multi_modality` model type.
        tokenizer = AutoTokenizer.from_pretrained(str(directory), config=PretrainedConfig())
        image_processor = ImageProcessor(ImageProcessorConfig.from_pretrained(directory))
        return cls(tokenizer, image_processor, num_image_tokens=num_image_tokens, **kwargs)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def build_prompt(self, messages: Sequence[dict[str, str]], system_prompt: str | None = None) -> str:
        sp = self.system_prompt if system_prompt is None else system_prompt
        return build_prompt(messages, sp, self.template)

    def process(
        self,
        messages: Sequence[dict[str, str]],
        images: Sequence[ImageSource] = (),
        system_prompt: str | None = None,
    ) -> Prepared:
        prompt, ids = self.encode(messages, system_prompt)
        n_slots = int((ids == self.image_id).sum()) // self.num_image_tokens
        if n_slots != len(images):
            raise ValueError(
                f"The prompt has {n_slots} {self.image_token} placeholder(s) "
                f"but {len(images)} image(s) were given."
            )
        return Prepared(
            input_ids=ids,
            images_seq_mask=ids == self.image_id,
            pixel_values=self.image_processor(images),
            num_images=len(images),
            prompt=prompt,
        )

    def encode(self, messages: Sequence[dict[str, str]], system_prompt: str | None = None) -> tuple[str, torch.Tensor]:
        """The prompt string and its token ids, each image placeholder expanded to its image-token slots."""
        prompt = self.build_prompt(messages, system_prompt)
        ids = torch.tensor(self.tokenizer.encode(prompt), dtype=torch.long)
        # Official add_image_token: each placeholder becomes num_image_tokens copies of its id.
        repeats = torch.where(ids == self.image_id, self.num_image_tokens, 1)
        return prompt, ids.repeat_interleave(repeats)

    def token_cost(self, messages: Sequence[dict[str, str]], system_prompt: str | None = None) -> int:
        """Sequence length ``process`` would produce, without touching any image."""
        return len(self.encode(messages, system_prompt)[1])

    def collate(self, samples: Sequence[Prepared]) -> Batch:
        if not samples:
            raise ValueError("collate needs at least one sample")
        b = len(samples)
        t = max(len(s.input_ids) for s in samples)
        n = max(1, max(s.num_images for s in samples))
        size = self.image_processor.config.image_size
        input_ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((b, t), dtype=torch.long)
        seq_mask = torch.zeros((b, t), dtype=torch.bool)
        pixel_values = torch.zeros((b, n, 3, size, size), dtype=torch.float32)
        emb_mask = torch.zeros((b, n, self.num_image_tokens), dtype=torch.bool)
        for i, s in enumerate(samples):
            length = len(s.input_ids)
            input_ids[i, t - length :] = s.input_ids
            attention_mask[i, t - length :] = 1
            seq_mask[i, t - length :] = s.images_seq_mask
            pixel_values[i, : s.num_images] = s.pixel_values
            emb_mask[i, : s.num_images] = True
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            pixel_values=pixel_values,
            images_seq_mask=seq_mask,
            images_emb_mask=emb_mask,
            prompts=[s.prompt for s in samples],
        )

    def __call__(
        self,
        messages: Sequence[dict[str, str]],
        images: Sequence[ImageSource] = (),
        system_prompt: str | None = None,
    ) -> Batch:
        return self.collate([self.process(messages, images, system_prompt)])
