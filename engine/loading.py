"""Loading DeepSeek-VL checkpoints: from a local directory or a hub id, official or deepseek-community layout.

The architecture is built on the meta device (no memory), the checkpoint's keys are checked strictly against
it, and tensors are assigned one by one in the requested dtype, so peak memory is about one copy of the weights.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import layouts
from .model.config import ConfigError, VLConfig
from .model.vlm import DeepSeekVL

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]
Progress = Callable[[str, int, int], None]  # (stage, done, total)


class LoadError(RuntimeError):
    """A checkpoint that cannot be loaded; the message says why and what to do."""


class LoadCancelled(LoadError):
    pass


@dataclass
class LinearSwap:
    """Replace some nn.Linear modules as their weights arrive (quantization), so that the full-precision copy of
    a quantized model never exists at once: `selects(module_name)` picks them, `build(module_name, linear)` makes
    the replacement from a loaded nn.Linear on the CPU."""

    selects: Callable[[str], bool]
    build: Callable[[str, torch.nn.Linear], torch.nn.Module]


@dataclass
class LoadedModel:
    model: DeepSeekVL
    config: VLConfig
    directory: Path
    layout: str  # "official" or "community"


# ------------------------------------------------------------------ locating the checkpoint
def resolve_directory(source: str | Path) -> Path:
    """A local directory as is; `org/name` is fetched from the hub (or its local cache)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise LoadError(f"{source} is a file; pass the checkpoint directory that holds config.json")
    if not HUB_ID.match(str(source)):
        raise LoadError(f"{source}: no such directory, and not a hub id like 'deepseek-ai/deepseek-vl-1.3b-chat'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated... the hub's own message is the useful part
        raise LoadError(f"could not fetch {source} from the Hugging Face hub: {e}") from e


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files: sharded or single safetensors, else PyTorch .bin files."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = directory / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise LoadError(f"{index} is not a valid shard index: {e}") from e
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise LoadError(f"{directory} is missing shard files listed in {index_name}: {', '.join(missing)}")
            return [directory / s for s in shards]
        if (directory / single).is_file():
            return [directory / single]
    loose = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if loose:
        return loose
    raise LoadError(f"{directory} holds no weights (model.safetensors, shards with an index, or pytorch_model.bin)")


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, Callable[[], torch.Tensor], tuple[int, ...]]]:
    """Yields (key, loader, shape) without reading tensor data until the loader is called."""
    for file in files:
        if file.suffix == ".safetensors":
            try:
                handle = safe_open(str(file), framework="pt")
                keys = list(handle.keys())
            except (SafetensorError, OSError) as e:
                raise LoadError(f"{file.name} is truncated or not a safetensors file ({e})") from e
            for key in keys:
                shape = tuple(handle.get_slice(key).get_shape())
                yield key, (lambda h=handle, k=key, f=file: _read_safetensor(h, k, f)), shape
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise LoadError(f"{file.name} is truncated or not a PyTorch checkpoint ({e})") from e
            for key, tensor in state.items():
                yield key, (lambda t=tensor: t), tuple(tensor.shape)


def _read_safetensor(handle, key: str, file: Path) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise LoadError(f"{file.name} is truncated: tensor {key!r} cannot be read ({e})") from e


def read_config(directory: Path) -> tuple[VLConfig, str]:
    path = directory / "config.json"
    if not path.is_file():
        raise LoadError(f"{directory} has no config.json: not a DeepSeek-VL checkpoint directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{path} is not valid JSON: {e}") from e
    try:
        return layouts.official_config(raw)
    except ConfigError as e:
        raise LoadError(str(e)) from e


# ------------------------------------------------------------------ building and loading
def build_model(cfg: VLConfig) -> DeepSeekVL:
    """Parameters on the meta device (nothing allocated); small buffers (rotary table, pixel stats) real."""
    with init_empty_weights(include_buffers=False):
        return DeepSeekVL(cfg)


def _describe(keys: set[str], limit: int = 12) -> str:
    shown = sorted(keys)[:limit]
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(shown) + more


def load_model(
    source: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    swap: LinearSwap | None = None,
) -> LoadedModel:
    """Load a checkpoint strictly. With `swap`, the selected linears are replaced as soon as their weights are
    read (quantized layer by layer: peak memory is about the quantized model, not the full-precision one)."""
    directory = resolve_directory(source)
    cfg, layout = read_config(directory)
    files = weight_files(directory)
    model = build_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    to_swap = {name: module for name, module in model.named_modules()
               if swap is not None and isinstance(module, torch.nn.Linear) and swap.selects(name)}
    replaced = tuple(f"{name}." for name in to_swap)

    checkpoint = {key: (loader, shape) for key, loader, shape in iter_checkpoint(files)}
    try:
        # Checkpoint keys → ours; for the community layout several tensors may merge into one of ours.
        entries = layouts.remap(checkpoint, layout, expected)
    except ConfigError as e:
        raise LoadError(f"{directory}: {e}") from e
    missing = set(expected) - set(entries)
    unexpected = set(entries) - set(expected)
    if missing or unexpected:
        parts = [f"{directory} ({layout} layout) does not match the architecture its config.json describes."]
        if missing:
            parts.append(f"Missing keys ({len(missing)}): {_describe(missing)}.")
        if unexpected:
            parts.append(f"Unexpected keys ({len(unexpected)}): {_describe(unexpected)}.")
        raise LoadError(" ".join(parts))
    wrong = {k for k, (_, shape) in entries.items() if tuple(shape) != expected[k]}
    if wrong:
        k = sorted(wrong)[0]
        raise LoadError(f"{len(wrong)} tensors have the wrong shape, e.g. {k}: checkpoint {entries[k][1]}, model {expected[k]}")

    total = len(entries)
    state, pending = {}, {}  # pending: tensors of a selected linear until all of its parameters are read
    for done, (key, (loader, _)) in enumerate(entries.items(), 1):
        if cancel is not None and cancel.is_set():
            raise LoadCancelled("model load cancelled")
        tensor = loader()
        module_name, _, param = key.rpartition(".")
        if module_name in to_swap:
            tensor = tensor.to(dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            pending.setdefault(module_name, {})[param] = tensor
            if len(pending[module_name]) == len(dict(to_swap[module_name].named_parameters())):
                linear = to_swap.pop(module_name)  # dropped with its full-precision weights once replaced
                linear.load_state_dict(pending.pop(module_name), strict=True, assign=True)
                set_module(model, module_name, swap.build(module_name, linear))
                del linear, tensor
        else:
            state[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        if progress is not None:
            progress("weights", done, total)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or any(not key.startswith(replaced) for key in missing):  # cannot happen after the checks above
        raise LoadError(f"internal: state dict mismatch after loading (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device)  # the non-persistent buffers
    model.eval()
    return LoadedModel(model=model, config=cfg, directory=directory, layout=layout)


def set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def save_pretrained(model: DeepSeekVL, directory: str | Path, max_shard_bytes: int = 4 << 30) -> Path:
    """Write an official-layout checkpoint: config.json and (sharded) model.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(model.config.to_official(), indent=1))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return directory


def fill_random(model: torch.nn.Module, dtype: torch.dtype = torch.float32, seed: int = 0, std: float = 0.02,
                device: str | torch.device = "cpu") -> torch.nn.Module:
    """Give a meta-built model random weights in `dtype` (norm weights 1, biases 0), skipping the slow default
    init: real-size architectures for speed and memory checks without a checkpoint. `device="cuda"` makes them
    there directly, with no CPU copy (a 7B in bf16 is 14 GiB). Buffers stay where they are."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            data = torch.empty(p.shape, dtype=dtype, device=device)
            if p.dim() == 1 and name == "weight":
                data.fill_(1.0)
            elif p.dim() == 1:
                data.zero_()
            else:
                data.normal_(0.0, std, generator=generator)
            module._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
    return model.eval()
