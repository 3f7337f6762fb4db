"""A loaded model ready to chat: weights on a device in a dtype (optionally 4/8-bit), plus its processor."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from . import kernels
from .kernels import native
from .kernels.bf16 import prepare_cpu_bf16
from .loading import LoadError, Progress, load_model
from .model.config import VLConfig
from .model.vlm import DeepSeekVL
from .processing import VLChatProcessor
from .quantize import OUTPUT_LAYER, linear_swap, pick_backend, quantizes_output

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_device(requested: str | None = None) -> torch.device:
    """`auto`/None: CUDA, then Apple MPS, then CPU. An explicit device that is not there is an error."""
    if requested in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoadError(f"--device {requested}: no CUDA GPU is available (use --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LoadError(f"--device {requested}: Apple MPS is not available (use --device cpu)")
    return device


def pick_dtype(device: torch.device, requested: str | None = None, quantization: str | None = None) -> torch.dtype:
    """CUDA: bf16 where supported, else fp16. MPS: fp16. CPU: fp32 unless asked otherwise, but bf16 when the
    language model is quantized (who asks for 8-bit wants memory saved; fp32 would double the rest)."""
    if requested:
        if requested not in DTYPES:
            raise LoadError(f"unknown dtype {requested!r}; choose one of {sorted(set(DTYPES))}")
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if quantization else torch.float32


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes held by parameters and buffers (quantized weights count at their packed size)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.is_meta:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def estimate_bytes(config: VLConfig, dtype: torch.dtype, quantization: str | None, output_int8: bool = False) -> int:
    """What loading will need, to refuse early with a useful message."""
    from .loading import build_model

    model = build_model(config)
    size = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for name, p in model.named_parameters():
        bits = 8 * size
        if quantization and ".layers." in name and name.startswith("language_model.model") and p.dim() == 2:
            bits = 4.5 if quantization == "4bit" else 8
        elif output_int8 and name == OUTPUT_LAYER + ".weight":
            bits = 8
        total += int(p.numel() * bits / 8)
    return total


def available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


@dataclass
class Runtime:
    model: DeepSeekVL
    processor: VLChatProcessor
    config: VLConfig
    directory: Path
    name: str
    device: torch.device
    dtype: torch.dtype
    quantization: str | None
    quant_backend: str | None = None  # "bitsandbytes", "int8", "nf4" or "int4" when quantized
    output_int8: bool = False  # the output layer stored as int8 rows (engine.quantize)

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        quantization: str | None = None,
        quant_backend: str = "auto",
        quantize_output: bool | None = None,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        check_memory: bool = True,
    ) -> "Runtime":
        from .loading import read_config, resolve_directory

        dev = pick_device(device)
        dt = pick_dtype(dev, dtype, quantization)
        backend = pick_backend(quantization, dev, quant_backend) if quantization else None
        output_int8 = quantizes_output(backend, quantize_output) if quantization else False
        directory = resolve_directory(source)
        config, _ = read_config(directory)
        need = estimate_bytes(config, dt, quantization, output_int8)
        have = available_bytes(dev)
        if check_memory and have is not None and need > have:
            hint = "" if quantization == "4bit" else " Try --load-4bit (or --load-8bit) to quantize the language model."
            raise LoadError(f"loading {directory.name} needs about {need / 2**30:.1f} GiB on {dev.type} "
                            f"but only {have / 2**30:.1f} GiB is free.{hint}")
        # Quantized layers are built on the CPU as each one's weights are read (only one layer's full-precision
        # weights exist at a time); bitsandbytes layers move to the GPU as they are built, the rest at the end.
        swap = linear_swap(quantization, dt, dev, backend, output_int8)[0] if quantization else None
        loaded = load_model(directory, dtype=dt, device="cpu" if quantization else dev, progress=progress,
                            cancel=cancel, swap=swap)
        model = loaded.model
        if quantization:
            model.to(dev)
        if dev.type == "cpu" and dt == torch.bfloat16:
            prepare_cpu_bf16(model)
        if dev.type == "cpu":
            native.kernels()  # compile the decode kernels now (about a second, once), not at the first token
        processor = VLChatProcessor.from_pretrained(directory, num_image_tokens=config.num_image_tokens)
        return cls(model=model, processor=processor, config=config, directory=directory, name=_display_name(source, directory),
                   device=dev, dtype=dt, quantization=quantization, quant_backend=backend, output_int8=output_int8)

    def advice(self) -> str | None:
        """A hint when the chosen setup is known to be slow, else None."""
        if self.device.type == "cpu" and self.quant_backend == "bitsandbytes":
            return (f"{self.quantization} through bitsandbytes on a CPU saves memory but decodes many times slower "
                    "than bf16 (measured 8x for NF4, 36x for LLM.int8); the default, --quant-backend auto, uses the "
                    "engine's CPU kernels instead (int8, nf4, or int4 without native kernels), which are faster "
                    "than bf16.")
        return None

    def backends(self) -> dict[str, str]:
        """{kind of operation: what runs it}, e.g. {"int8 matmul (decode)": "native AVX2 int8", ...}."""
        return kernels.backends(self.device, self.dtype, self.quantization, self.quant_backend)

    def backend(self) -> str:
        """One line: what multiplies the weights while decoding (stored with each answer, shown in banners)."""
        return kernels.summary(self.device, self.dtype, self.quantization, self.quant_backend)

    def describe(self) -> dict:
        return {
            "model": self.name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantization": self.quantization or "none",
            "quant_backend": self.quant_backend or "none",
            "quantized_as": f"{self.quantization} ({self.quant_backend})" if self.quantization else "none",
            "output_layer": "int8" if self.output_int8 else str(self.dtype).removeprefix("torch."),
            "advice": self.advice(),
            "backend": self.backend(),
            "backends": self.backends(),
            "memory_bytes": model_bytes(self.model),
            "context": self.config.max_context,
            "image_tokens": self.config.num_image_tokens,
            "image_size": self.config.vision.input_size,
        }


def _display_name(source, directory: Path) -> str:
    text = str(source)
    return text if "/" in text and not Path(text).exists() else directory.name
