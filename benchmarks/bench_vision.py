"""Image encode per image: our vision towers against the same architecture in transformers, on the same weights.

    .venv/bin/python benchmarks/bench_vision.py [--model 1.3b 7b] [--dtype fp32 bf16] [--batch 1 4] [--repeat 3]
    .venv/bin/python benchmarks/bench_vision.py --smoke     # tiny towers through the whole path, in seconds

Towers, built with seeded random weights of the real architecture (nothing is downloaded):
- 1.3B: SigLIP-L/16 at 384 px (width 1024, 24 blocks, 16 heads, MLP 4096; select_layer -1 = every block, then the
  final LayerNorm; the attention-pool head is unused). transformers: `SiglipVisionModel` (`vision_use_head=False`,
  exact GELU, LayerNorm eps 1e-6 as timm's tower), its `last_hidden_state`.
- 7B: the hybrid. SAM-B at 1024 px (width 768, 12 blocks, 14×14 windows, global attention at blocks 2, 5, 8, 11,
  neck to 256 channels), plus what DeepSeek-VL adds after SAM's neck: a resize to 96×96 and two stride-2 convs
  (256 → 512 → 1024 channels, 24×24 = 576 tokens), and a second neck (`neck_hd`) on the first global block's
  output through the same convs, added scaled by a learned scalar. And SigLIP-L at 384 on a 1024 → 384 resize of the
  same image. transformers has all of it: `DeepseekVLHybridModel`'s `get_high_res_image_features` (its
  `SamVisionModel` = SAM-B encoder and neck, then `high_res_vision_neck` / `high_res_vision_proj` /
  `high_res_vision_alpha` for DeepSeek's additions) and `get_low_res_image_features` (a `SiglipVisionModel`);
  its language model (a 1-layer stand-in) and aligner are dropped unbuilt: the aligner is not run on either side.
  Per-tower pixel normalisation (and the 384 resize) is inside our tower; for transformers the same ops run in the
  timed call, as its image processor would have done them.

Our random weights are copied into the transformers models through engine/layouts.py's community mapping (fused
qkv split into q/k/v, position-embedding shape), and the fp32 outputs on one image are compared: the max difference
printed shows it is the same computation. LayerNorm weights and biases and the hybrid's `neck_hd` scale are moved
off their neutral values first, so a wrong mapping of them would show.

Timing: per image (batch 1, and batch 4 divided by 4), fp32 and bf16, medians of --repeat runs after --warmup,
round-robin over all rows (each round runs every row once), so load drift on a shared machine hits every row alike.
bf16 runs ours as the runtime sets it up: on a CPU without native bf16 (no AVX512_BF16 / AMX) its matrix products
are upcast to fp32 (`engine/kernels/bf16.py`); transformers runs plain bf16. `--plain-bf16` adds a row of ours
without the upcast (the same computation as transformers' bf16). Prints one Markdown table with the machine line.
Cost at full size (not yet run; an estimate from bench_engine's encode times): on the 2-core CPU, roughly an hour
for everything with --repeat 3 (transformers' bf16 rows and the SAM batch-4 rows dominate), about 7 GiB of RAM;
--model / --dtype / --batch narrow it, and each round's time goes to stderr as it ends.
Not part of the test suite (tests/test_bench_vision.py runs the smoke mode's equality check).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.kernels.bf16 import native_bf16, prepare_cpu_bf16  # noqa: E402
from engine.layouts import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, community_pieces  # noqa: E402
from engine.loading import fill_random  # noqa: E402
from engine.model.config import SAMConfig, SigLIPConfig, VisionConfig, deepseek_vl_1_3b, deepseek_vl_7b  # noqa: E402
from engine.model.vision import build_vision  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def tiny_configs() -> dict[str, VisionConfig]:
    """Small towers of the same structure. The hybrid's SigLIP grid must be 24×24 (the SAM half is resized to 96 and
    halved twice), so its SigLIP uses 4-px patches of a 96-px view; SAM's 16×16 grid is padded to two 14-px windows
    per side, and its global block sits between two windowed ones."""
    siglip = dict(width=64, layers=2, heads=4, mlp_ratio=4.0)
    return {
        "1.3b": VisionConfig(low=SigLIPConfig(image_size=64, patch_size=16, **siglip)),
        "7b": VisionConfig(
            low=SigLIPConfig(image_size=96, patch_size=4, pixel_mean=tuple(SIGLIP_MEAN), pixel_std=tuple(SIGLIP_STD), **siglip),
            high=SAMConfig(image_size=256, width=64, layers=3, heads=4, global_attn_indexes=(1,), neck_channels=16,
                           downsample_channels=(32, 64), pixel_mean=tuple(CLIP_MEAN), pixel_std=tuple(CLIP_STD)),
            high_output_dim=64, low_output_dim=64),
    }


def full_configs() -> dict[str, VisionConfig]:
    return {"1.3b": deepseek_vl_1_3b().vision, "7b": deepseek_vl_7b().vision}


# ------------------------------------------------------------------ ours
def our_tower(cfg: VisionConfig, seed: int = 0) -> nn.Module:
    """Our tower (the model's `vision_model`) with seeded random fp32 weights."""
    with init_empty_weights(include_buffers=False):  # parameters on meta, pixel statistics real
        tower = build_vision(cfg)
    fill_random(tower, torch.float32, seed=seed)
    # fill_random leaves 1-D weights at 1 and biases and scalars at 0, where a wrong mapping of them cannot show.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            if name.endswith("hd_alpha_downsamples"):
                p.fill_(0.5)
    return tower


# ------------------------------------------------------------------ transformers, same weights
def hf_siglip_config(low: SigLIPConfig):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=low.width, intermediate_size=int(low.width * low.mlp_ratio),
                              num_hidden_layers=low.layers, num_attention_heads=low.heads, num_channels=3,
                              image_size=low.image_size, patch_size=low.patch_size, hidden_act="gelu",
                              layer_norm_eps=1e-6, vision_use_head=False)


def hf_sam_config(high: SAMConfig):
    from transformers import SamVisionConfig

    return SamVisionConfig(hidden_size=high.width, output_channels=high.neck_channels, num_hidden_layers=high.layers,
                           num_attention_heads=high.heads, num_channels=3, image_size=high.image_size,
                           patch_size=high.patch_size, window_size=high.window_size,
                           global_attn_indexes=list(high.global_attn_indexes), mlp_dim=4 * high.width,
                           hidden_act="gelu", layer_norm_eps=1e-6)


def hf_state(tower: nn.Module, hybrid: bool) -> dict[str, torch.Tensor]:
    """Our tower's weights under transformers' names (copies), via the community layout's mapping."""
    out = {}
    for key, tensor in tower.state_dict().items():
        key = "vision_model." + key  # our tower's place in the full model, which the mapping is written for
        pieces = community_pieces(key, tuple(tensor.shape), hybrid)
        if pieces is None or ".attn_pool." in key:  # tensors the forward never uses (the hybrid's spare norms, the head)
            continue
        for p in pieces:
            part = tensor if p.ours_rows is None else tensor[p.ours_rows[0]: p.ours_rows[1]]
            out[p.key] = (part.squeeze(0) if p.squeeze else part).clone()
    # Community keys name the full DeepseekVL(Hybrid)ForConditionalGeneration; strip down to the module we build.
    prefix = "model." if hybrid else "model.vision_model."
    return {k.removeprefix(prefix): v for k, v in out.items()}


def hf_tower(cfg: VisionConfig, state: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """transformers' SiglipVisionModel (1.3B) or DeepseekVLHybridModel (7B) holding `state` in `dtype`."""
    from transformers import DeepseekVLHybridConfig, DeepseekVLHybridModel, SiglipVisionModel

    if cfg.hybrid:
        text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=4, vocab_size=256)  # never run
        config = DeepseekVLHybridConfig(text_config=text, vision_config=hf_siglip_config(cfg.low).to_dict(),
                                        high_res_vision_config=hf_sam_config(cfg.high).to_dict())
        with init_empty_weights():  # parameters on meta until the state is assigned
            model = DeepseekVLHybridModel(config)
        result = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
        unused = [k for k in result.missing_keys if not k.startswith(("language_model.", "aligner."))]
        if unused or result.unexpected_keys:
            raise RuntimeError(f"weight mapping: missing {unused}, unexpected {result.unexpected_keys}")
        del model.language_model, model.aligner  # still on meta; image features never use them
    else:
        with init_empty_weights():
            model = SiglipVisionModel(hf_siglip_config(cfg.low))
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def normalise(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """The hybrid's low-resolution view, as the official processor makes it (antialiased bilinear, in float)."""
    return F.interpolate(pixels.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True).to(pixels.dtype)


# ------------------------------------------------------------------ the compared encoders
@dataclass
class Pair:
    """One model's tower in both implementations and dtypes. `parts` names what is timed: part -> impl -> dtype ->
    a function from pixels ([B, 3, S, S]; the 1.3B's normalised by the processor, the 7B's in [0, 1]) to features."""

    name: str
    cfg: VisionConfig
    parts: dict[str, dict[str, dict[str, Callable[[torch.Tensor], torch.Tensor]]]] = field(default_factory=dict)
    params: int = 0
    hf_attention: str = ""  # transformers' attention implementation (sdpa unless it falls back)

    @property
    def size(self) -> int:
        return self.cfg.input_size


def build_pair(name: str, cfg: VisionConfig, dtypes: list[str], device: torch.device, plain_bf16: bool = False) -> Pair:
    base = our_tower(cfg)
    state = hf_state(base, cfg.hybrid)
    pair = Pair(name, cfg, params=sum(p.numel() for p in base.parameters()))
    for dname in dtypes:
        dtype = DTYPES[dname]
        variants = {"ours": copy.deepcopy(base).to(device, dtype)}
        if dtype == torch.bfloat16 and device.type == "cpu":
            if plain_bf16 and not native_bf16():
                variants["ours, plain bf16"] = copy.deepcopy(variants["ours"])
            prepare_cpu_bf16(variants["ours"])  # as Runtime.load does
        hf = hf_tower(cfg, state, dtype).to(device)
        pair.hf_attention = hf.config._attn_implementation
        for impl, ours in variants.items():
            for part, fn in our_parts(ours, cfg).items():
                pair.parts.setdefault(part, {}).setdefault(impl, {})[dname] = fn
        for part, fn in hf_parts(hf, cfg).items():
            pair.parts.setdefault(part, {}).setdefault("transformers", {})[dname] = fn
    del base, state
    return pair


def our_parts(tower: nn.Module, cfg: VisionConfig) -> dict[str, Callable]:
    if not cfg.hybrid:
        return {"SigLIP-L": tower}
    return {"SAM-B": tower.vision_tower_high,
            "SigLIP-L": lambda px: tower.vision_tower_low(tower.low_res_view(px))}


def hf_parts(model: nn.Module, cfg: VisionConfig) -> dict[str, Callable]:
    if not cfg.hybrid:
        return {"SigLIP-L": lambda px: model(pixel_values=px).last_hidden_state}
    high, low = cfg.high, cfg.low
    return {"SAM-B": lambda px: model.get_high_res_image_features(normalise(px, high.pixel_mean, high.pixel_std)).last_hidden_state,
            "SigLIP-L": lambda px: model.get_low_res_image_features(
                normalise(resize(px, low.image_size), low.pixel_mean, low.pixel_std)).last_hidden_state}


def pixels_for(pair: Pair, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.rand(batch, 3, pair.size, pair.size, generator=torch.Generator().manual_seed(batch))
    if not pair.cfg.hybrid:
        x = 2 * x - 1  # the 1.3B's processor normalises with mean = std = 0.5
    return x.to(device, dtype)


@torch.inference_mode()
def equality(pair: Pair, dtype: str = "fp32", device: torch.device = torch.device("cpu")) -> dict[str, tuple[float, float]]:
    """Per part: (max |ours - transformers|, that / max |transformers|) on one image."""
    px = pixels_for(pair, 1, DTYPES[dtype], device)
    out = {}
    for part, impls in pair.parts.items():
        a, b = impls["ours"][dtype](px).float(), impls["transformers"][dtype](px).float()
        if a.shape != b.shape:
            raise RuntimeError(f"{pair.name} {part}: ours {tuple(a.shape)} vs transformers {tuple(b.shape)}")
        diff = (a - b).abs().max().item()
        out[part] = (diff, diff / b.abs().max().item())
    return out


# ------------------------------------------------------------------ timing
def timed(fn: Callable, px: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        fn(px)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def run_rounds(pairs: list[Pair], dtypes: list[str], batches: list[int], warmup: int, repeat: int,
               device: torch.device) -> dict[tuple, list[float]]:
    """(model, part, impl, dtype, batch) -> seconds per call, one call per row per round."""
    rows = {}
    for pair in pairs:
        for dname in dtypes:
            for batch in batches:
                px = pixels_for(pair, batch, DTYPES[dname], device)
                for part, impls in pair.parts.items():
                    for impl, fns in impls.items():
                        if dname in fns:
                            rows[(pair.name, part, impl, dname, batch)] = (fns[dname], px)
    times: dict[tuple, list[float]] = {key: [] for key in rows}
    for r in range(warmup + repeat):
        start = time.perf_counter()
        for key, (fn, px) in rows.items():
            t = timed(fn, px, device)
            if r >= warmup:
                times[key].append(t)
        print(f"round {r + 1}/{warmup + repeat}{' (warm-up)' if r < warmup else ''}: {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)
    return times


# ------------------------------------------------------------------ report
def machine(device: torch.device) -> str:
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    import transformers

    return (f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, native bf16: {'yes' if native_bf16() else 'no'}")


PART_TITLES = {
    ("1.3b", "SigLIP-L"): "1.3B SigLIP-L/16 @384",
    ("7b", "SAM-B"): "7B SAM-B @1024 + neck_hd, downsample convs",
    ("7b", "SigLIP-L"): "7B SigLIP-L/16 @384 (+ 1024→384 resize)",
    ("7b", "total"): "7B hybrid total",
}


def table(pairs: list[Pair], times: dict[tuple, list[float]], dtypes: list[str], batches: list[int]) -> str:
    impls = [i for i in ("ours", "ours, plain bf16", "transformers") if any(k[2] == i for k in times)]
    # The hybrid's total per round: its two halves' times in that round added.
    for pair in pairs:
        if pair.cfg.hybrid:
            for impl in impls:
                for d in dtypes:
                    for b in batches:
                        halves = [times.get((pair.name, part, impl, d, b)) for part in ("SAM-B", "SigLIP-L")]
                        if all(halves):
                            times[(pair.name, "total", impl, d, b)] = [x + y for x, y in zip(*halves)]
    header = "| tower | dtype | batch | " + " | ".join(f"{i} s/image" for i in impls) + " | transformers / ours |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for pair in pairs:
        parts = list(pair.parts) + (["total"] if pair.cfg.hybrid else [])
        for part in parts:
            for d in dtypes:
                for b in batches:
                    med = {i: statistics.median(times[k]) / b for i in impls
                           if (k := (pair.name, part, i, d, b)) in times and times[k]}
                    if not med:
                        continue
                    cells = " | ".join(f"{med[i]:.3g}" if i in med else "–" for i in impls)
                    ratio = f"{med['transformers'] / med['ours']:.2f}×" if "ours" in med and "transformers" in med else "–"
                    lines.append(f"| {PART_TITLES.get((pair.name, part), f'{pair.name} {part}')} | {d} | {b} | {cells} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", choices=["1.3b", "7b"], default=["1.3b", "7b"])
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--plain-bf16", action="store_true", help="add ours in bf16 without the CPU fp32 upcast")
    parser.add_argument("--equality-only", action="store_true", help="build, print the equality check, time nothing")
    parser.add_argument("--smoke", action="store_true", help="tiny towers, one round after one warm-up")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.repeat = 1
    device = torch.device(args.device)
    load_before = os.getloadavg()
    configs = tiny_configs() if args.smoke else full_configs()

    pairs = []
    for name in args.model:
        t = time.perf_counter()
        pairs.append(pair := build_pair(name, configs[name], args.dtype, device, args.plain_bf16))
        print(f"{name}: built ({pair.params / 1e6:.1f} M parameters per copy) in {time.perf_counter() - t:.1f} s",
              file=sys.stderr, flush=True)

    print("Same computation: ours vs transformers on one image, same weights "
          "(max |diff|, and that / max |transformers|):\n")
    for pair in pairs:
        for d in args.dtype:
            for part, (diff, rel) in equality(pair, d, device).items():
                print(f"- {PART_TITLES.get((pair.name, part), part)}, {d}: max |diff| {diff:.2e}, relative {rel:.2e}")
    if "bf16" in args.dtype:
        print("\n(bf16 differs by rounding only: our SAM half resizes its neck output in fp32 as the official code does, "
              "transformers in bf16" + ("; on this CPU our products are upcast to fp32)" if device.type == "cpu" and not native_bf16() else ")"))
    print()
    if args.equality_only:
        return

    times = run_rounds(pairs, args.dtype, args.batch, args.warmup, args.repeat, device)
    size = "tiny towers (--smoke)" if args.smoke else "real sizes, random weights"
    size += f"; transformers attention: {', '.join(sorted({p.hf_attention for p in pairs}))}"
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {args.device}; {machine(device)}")
    print(f"{size}; medians of {args.repeat} round-robin runs after {args.warmup} warm-up; seconds per image "
          f"(batch 4: the call's time / 4); 1-min load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}\n")
    print(table(pairs, times, args.dtype, args.batch))


if __name__ == "__main__":
    main()
