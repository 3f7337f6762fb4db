"""The training loop: stages in a chain, optimizer steps, atomic checkpoints, exact resume, metrics.

    train(RunConfig(...))  →  OUT/stage-1/, OUT/stage-2/, OUT/stage-3/, OUT/final/   (official layout)
                              OUT/metrics.jsonl, OUT/run.json, OUT/checkpoints/stage-N-step-SSSSSSS/

One optimizer step = one global batch (`batch_size` samples over all processes), split into micro-batches of
`micro_batch_size` per process with gradient accumulation. The loss is a sum over supervised tokens divided by
the global batch's number of supervised tokens (every process knows it: the sampler is the same everywhere), and
gradients are summed across processes, so N processes make the very update one process makes on the same batch.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..loading import load_model, read_config, resolve_directory, save_pretrained
from ..model.vlm import DeepSeekVL
from ..processing import VLChatProcessor
from . import data as datamod
from .data import IGNORE, LANGUAGE, MULTIMODAL, Encoded
from .mixture import ModalitySchedule, Rows, Sampler, micro_batches
from .stages import STAGE_NAMES, STAGES, StageConfig, scaled, set_trainable

PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "preprocessor_config.json", "processor_config.json", "generation_config.json", "chat_template.jinja")


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


@dataclass
class RunConfig:
    model: str  # checkpoint directory or hub id the first stage starts from
    out: str
    data: list[str] = field(default_factory=list)  # conversation files (JSONL / LLaVA JSON / messages)
    text_data: list[str] = field(default_factory=list)  # language data for stage 2 ({"text"} JSONL or .txt)
    stages: list[int] = field(default_factory=lambda: [1, 2, 3])
    overrides: dict = field(default_factory=dict)  # StageConfig fields for every stage
    stage_overrides: dict = field(default_factory=dict)  # {stage: {field: value}}, wins over `overrides`
    seed: int = 0
    save_every: int = 0  # resume checkpoint every N optimizer steps (0: none inside a stage)
    keep_checkpoints: int = 2
    resume: bool = False
    skip_bad: bool = False
    lora: bool = False
    qlora: bool = False  # 4-bit NF4 language model (bitsandbytes) + LoRA
    lora_rank: int = 16
    lora_alpha: int = 32
    bf16: bool = False  # bf16 autocast (master weights stay float32)
    gradient_checkpointing: bool = False
    fsdp: bool = False  # shard weights, gradients and optimizer state over the processes (PyTorch FSDP2)
    optimizer: str = "adamw"  # or "adamw8bit" (bitsandbytes)
    device: str = "auto"
    max_length: int | None = None  # longest sample allowed (default: the model's context)
    eval_mc: str | None = None  # multi-choice PPL file evaluated at each stage end (and every eval_every steps)
    eval_text: str | None = None
    eval_every: int = 0
    check_memory: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    final: Path | None  # OUT/final, when every stage finished
    stages_done: list[int]
    stopped: bool = False  # stopped on request; a checkpoint was saved and --resume continues


# ------------------------------------------------------------------ processes
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    sharded: bool = False  # FSDP: parameters live as shards; full state is gathered collectively

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun / accelerate launch set WORLD_SIZE, RANK and the rendezvous address; join their group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def _all_sum(tensors: list[torch.Tensor], d: Dist) -> None:
    if d.world > 1 and tensors:
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def _agree(flag: bool, d: Dist) -> bool:
    """True on every process when it is true on any (a stop request reaches the processes at different times)."""
    if d.world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ------------------------------------------------------------------ metrics
class Metrics:
    """OUT/metrics.jsonl: one JSON object per line, written and flushed by the main process only."""

    def __init__(self, path: Path, d: Dist, log: Callable[[str], None]):
        self.path, self.d, self.log = path, d, log

    def write(self, record: dict) -> None:
        if not self.d.main:
            return
        record = {**record, "time": round(time.time(), 3)}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def event(self, event: str, message: str | None = None, **fields) -> None:
        self.write({"type": "event", "event": event, **fields, **({"message": message} if message else {})})
        if message and self.d.main:
            self.log(message)

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, size: int) -> None:
        """Drop lines written after a checkpoint, so a resumed run's metrics read as one run."""
        if self.d.main and self.path.exists():
            with open(self.path, "r+b") as f:
                f.truncate(size)


# ------------------------------------------------------------------ schedules
def lr_factor(step: int, cfg: StageConfig) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warm-up, then cosine to
    `min_lr_ratio`, or DeepSeek LLM's multi-step schedule (x0.316 at 80 % of the steps, x0.1 at 90 %)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "step":
        return 1.0 if step < 0.8 * cfg.steps else 0.316 if step < 0.9 * cfg.steps else 0.1
    raise TrainingError(f"unknown LR schedule {cfg.schedule!r}; use 'cosine' or 'step'")


def param_groups(model: torch.nn.Module, cfg: StageConfig) -> list[dict]:
    """The trainable parameters, the vision tower's in a group of its own at lr x vision_lr_ratio: a tower
    pretrained on far more images than the fine-tuning data can lose what it knew at the LLM's rate."""
    if not cfg.vision_lr_ratio >= 0:
        raise TrainingError(f"vision_lr_ratio must be 0 or more (0 freezes the tower's updates), got {cfg.vision_lr_ratio}")
    vision, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (vision if name.startswith("vision_model.") else rest).append(p)
    groups = [{"name": "rest", "params": rest, "lr": cfg.lr},
              {"name": "vision", "params": vision, "lr": cfg.lr * cfg.vision_lr_ratio}]
    return [g for g in groups if g["params"]]


def make_optimizer(groups: list[dict], cfg: StageConfig, kind: str):
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise TrainingError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if kind != "adamw":
        raise TrainingError(f"unknown optimizer {kind!r}; use adamw or adamw8bit")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


# ------------------------------------------------------------------ the model for a stage
def enable_gradient_checkpointing(model: DeepSeekVL) -> int:
    """Recompute each decoder layer and ViT block in the backward pass instead of keeping its activations.
    The blocks' forwards are wrapped in place (module names, hence checkpoint keys, stay the same)."""
    from torch.utils.checkpoint import checkpoint

    blocks = list(model.language_model.model.layers)
    for name, module in model.vision_model.named_modules():
        if name.endswith(("blocks", "blocks.")) and isinstance(module, torch.nn.ModuleList):
            blocks += list(module)
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
    return len(blocks)


def prepare_model(source: str | Path, stage: int, run: RunConfig, device: torch.device) -> tuple[DeepSeekVL, list[str]]:
    """Load `source` in float32, freeze what the stage does not train, add LoRA / QLoRA adapters when asked.
    Returns the model and the names of its trainable parameters."""
    model = load_model(source, dtype=torch.float32, device=device).model
    trainable = set_trainable(model, stage)
    if run.lora or run.qlora:
        trainable = add_lora(model, trainable, run, device)
    if run.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    return model, trainable


def shard(model: DeepSeekVL) -> None:
    """FSDP2: each decoder layer is one unit (its weights gathered just before use), the rest is the root unit.
    Gradients are reduce-scattered as averages, so the loss is scaled by the number of processes."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.language_model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def full_state(model, optimizer=None, d: Dist = Dist()) -> tuple[dict, dict | None]:
    """Trainable parameters (full tensors on the CPU) and optimizer state, from a sharded model too. Collective
    under FSDP: every process must call it."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if not d.sharded:
        params = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if n in trainable}
        return params, optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=options), None
    params, optim = get_state_dict(model, optimizer, options=options)
    return {k: v for k, v in params.items() if k in trainable}, optim


def add_lora(model: DeepSeekVL, trainable: list[str], run: RunConfig, device: torch.device) -> list[str]:
    """LoRA on every linear layer the stage would train, except the adaptor, which trains fully (it is small, and
    stage 1 trains nothing else). QLoRA first stores the language model's decoder linears in 4-bit NF4."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise TrainingError("--lora / --qlora need peft: pip install peft") from e
    wanted = {n.rpartition(".")[0] for n in trainable if not n.startswith("aligner.")}
    targets = sorted(name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name in wanted)
    if run.qlora:
        from ..quantize import quantize_language_model

        quantize_language_model(model, "4bit", torch.bfloat16 if run.bf16 else torch.float32, device,
                                backend="bitsandbytes")
    if targets:
        inject_adapter_in_model(LoraConfig(r=run.lora_rank, lora_alpha=run.lora_alpha, lora_dropout=0.0,
                                           target_modules=targets), model)
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or (name.startswith("aligner.") and name in trainable))
        if p.requires_grad:
            names.append(name)
    return names


def official_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the official keys, LoRA adapters merged (and 4-bit weights dequantized)."""
    LoraLayer = ()
    if any(".lora_" in name for name, _ in model.named_parameters()):  # importing peft costs seconds: only then
        from peft.tuners.lora import LoraLayer
    state, skip = {}, []
    for name, module in model.named_modules():
        if skip and name.startswith(tuple(skip)):
            continue  # inside a layer already merged (a LoRA layer's base_layer)
        if LoraLayer and isinstance(module, LoraLayer):
            base = module.get_base_layer()
            weight = _dequantized(base)
            delta = module.get_delta_weight("default").to(weight.device, torch.float32)
            state[f"{name}.weight"] = (weight.float() + delta).detach()
            if base.bias is not None:
                state[f"{name}.bias"] = base.bias.detach().float()
            skip.append(f"{name}.")
        elif type(module).__name__ == "Linear4bit":
            state[f"{name}.weight"] = _dequantized(module).float()
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.detach().float()
            skip.append(f"{name}.")
    for key, tensor in model.state_dict().items():
        if not key.startswith(tuple(skip)):
            state[key] = tensor.detach()
    return state


def _dequantized(linear: torch.nn.Module) -> torch.Tensor:
    weight = linear.weight
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf

        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # On an AVX512_BF16 CPU bitsandbytes repacks the weight for its own kernel at the first product, and
            # dequantize_4bit reads the standard layout: undo it on copies, as bitsandbytes' own state_dict does,
            # leaving the live layer as it is (its exports differed by 0.3 % in loss from the model they came from).
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        return bnbf.dequantize_4bit(data, state)
    return weight.detach()


def export(model: DeepSeekVL, processor_dir: Path, directory: Path, state: dict | None = None) -> Path:
    """Write an official-layout checkpoint (config, weights, tokenizer and processor files) atomically: into a
    temporary sibling first, renamed into place when complete. `state`: the full weights (from a sharded model)."""
    from ..loading import build_model

    state = official_state_dict(model) if state is None else state
    clean = build_model(model.config)
    clean.load_state_dict({k: v.float().cpu() for k, v in state.items()}, strict=True, assign=True)
    tmp = directory.parent / f".tmp-{directory.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(clean, tmp)
    for name in PROCESSOR_FILES:
        if (processor_dir / name).is_file():
            shutil.copyfile(processor_dir / name, tmp / name)
    _replace_dir(tmp, directory)
    return directory


def _replace_dir(tmp: Path, directory: Path) -> None:
    _fsync_tree(tmp)
    if directory.exists():
        old = directory.parent / f".old-{directory.name}-{os.getpid()}"
        os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, directory)
    _fsync_dir(directory.parent)


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete_checkpoint(directory: Path) -> bool:
    """An exported stage: written under a temporary name and renamed, so it exists only when complete."""
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


# ------------------------------------------------------------------ resume checkpoints
CHECKPOINTS = "checkpoints"


def checkpoint_name(stage: int, step: int) -> str:
    return f"stage-{stage}-step-{step:07d}"


def latest_checkpoint(out: Path, stage: int) -> Path | None:
    """The newest complete resume checkpoint of `stage` (temporary directories of an interrupted save have
    another name and are never picked)."""
    folder = out / CHECKPOINTS
    found = sorted(folder.glob(f"stage-{stage}-step-*")) if folder.is_dir() else []
    found = [p for p in found if (p / "state.json").is_file()]
    return found[-1] if found else None


def save_checkpoint(out: Path, stage: int, step: int, params: dict, optimizer_state: dict, scheduler, sampler: Sampler,
                    cfg: StageConfig, metrics_bytes: int, keep: int) -> Path:
    """Trainable parameters, optimizer, scheduler, sampler and RNG state, written to a temporary directory and
    renamed: a process killed mid-save leaves the previous checkpoint as the latest complete one."""
    folder = out / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / checkpoint_name(stage, step)
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(params, tmp / "trainable.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    state = {"stage": stage, "step": step, "scheduler": scheduler.state_dict(), "sampler": sampler.state(),
             "stage_config": cfg.to_dict(), "metrics_bytes": metrics_bytes}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))  # written last: marks the content complete
    _replace_dir(tmp, final)
    for old in sorted(folder.glob(f"stage-{stage}-step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, sampler: Sampler, d: Dist = Dist()) -> dict:
    state = json.loads((path / "state.json").read_text())
    params = load_file(path / "trainable.safetensors")
    named = dict(model.named_parameters())
    missing = set(params) ^ {n for n, p in named.items() if p.requires_grad}
    if missing:
        raise TrainingError(f"{path} does not match this run's trainable parameters (e.g. {sorted(missing)[:2]}); "
                            "was it saved with other --lora/--qlora or stage settings?")
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=False)
    if d.sharded:  # every process reads the full state; each keeps its shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=params, optim_state_dict=optimizer_state,
                       options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        with torch.no_grad():
            for name, value in params.items():
                named[name].copy_(value)
        try:
            optimizer.load_state_dict(optimizer_state)
        except ValueError as e:  # e.g. saved before the vision tower had a parameter group of its own
            raise TrainingError(f"{path}: its optimizer state does not fit this run's parameter groups ({e}); "
                                "start the stage again without --resume") from e
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state(state["sampler"])
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


# ------------------------------------------------------------------ one micro-batch
def image_inputs(processor: VLChatProcessor, rows: Rows) -> dict:
    """pixel_values [B, n, 3, S, S] (zero slots where a row has fewer images) and the masks the model takes."""
    counts = [len(paths) for paths in rows.images]
    pixels = processor.image_processor([str(p) for paths in rows.images for p in paths])  # [M, 3, S, S]
    size = pixels.shape[-1]
    B, n = len(counts), max(counts)
    pixel_values = torch.zeros(B, n, 3, size, size)
    emb_mask = torch.zeros(B, n, processor.num_image_tokens, dtype=torch.bool)
    at = 0
    for i, c in enumerate(counts):
        pixel_values[i, :c] = pixels[at:at + c]
        emb_mask[i, :c] = True
        at += c
    return {"pixel_values": pixel_values, "images_seq_mask": rows.images_seq_mask, "images_emb_mask": emb_mask}


def loss_sum(model: DeepSeekVL, rows: Rows, processor: VLChatProcessor, device: torch.device,
             bf16: bool = False) -> torch.Tensor:
    """Summed next-token cross entropy over the supervised positions of one micro-batch. Everything goes through
    the model's own forward (FSDP gathers parameters there). Frozen towers build no autograd graph: neither their
    weights nor their input need gradients."""
    inputs = {"input_ids": rows.input_ids, "position_ids": rows.position_ids}
    if rows.attention_mask is not None:
        inputs["attention_mask"] = rows.attention_mask
    if any(rows.images):
        inputs.update(image_inputs(processor, rows))
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(**inputs)
    logits = out.logits[:, :-1].float()
    labels = rows.labels[:, 1:].to(device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")


def supervised(samples: list[Encoded]) -> int:
    return sum(int((s.labels[1:] != IGNORE).sum()) for s in samples)


# ------------------------------------------------------------------ a run
def stage_samples(stage: int, report: datamod.Report) -> list[datamod.Sample]:
    """Stage 1: image-text data only. Stage 2: conversations and raw language data. Stage 3 (SFT):
    conversations, multimodal and text-only."""
    samples = report.samples
    if stage == 1:
        return [s for s in samples if s.modality == MULTIMODAL]
    if stage == 2:
        return list(samples)
    return [s for s in samples if s.text is None]


def train(run: RunConfig, log: Callable[[str], None] = print, stop: threading.Event | None = None,
          on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Run the stages in order, each from the previous one's output. `stop` (set from another thread or a
    signal handler) ends the run after the current step with a checkpoint; `on_step` sees each step's record."""
    d = init_distributed()
    stop = stop or threading.Event()
    bad = [s for s in run.stages if s not in STAGES]
    if bad or not run.stages or sorted(run.stages) != list(run.stages):
        raise TrainingError(f"stages must be an increasing list drawn from {STAGES}, got {run.stages}")
    if run.lora and run.qlora:
        raise TrainingError("choose --lora or --qlora, not both")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        raise TrainingError("the DeepSpeed engine is not wired into this trainer (see engine/training/configs/); "
                            "use the FSDP config or --fsdp for sharding, plain torchrun for data parallelism")
    # `accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP; the loop shards with PyTorch's FSDP2 itself.
    if d.world > 1 and (run.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")):
        if run.lora or run.qlora:
            raise TrainingError("--fsdp with --lora/--qlora is not supported: LoRA's small state does not need sharding")
        d = replace(d, sharded=True)
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    _check_run_file(out, run, d)
    metrics = Metrics(out / "metrics.jsonl", d, log)

    from ..runtime import pick_device

    device = pick_device(run.device)
    if device.type == "cuda" and d.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", d.rank)))
        torch.cuda.set_device(device)
    base_dir = resolve_directory(run.model)
    model_config, _ = read_config(base_dir)
    processor = VLChatProcessor.from_pretrained(base_dir, num_image_tokens=model_config.num_image_tokens)
    max_length = run.max_length or model_config.max_context
    report = datamod.load(run.data, run.text_data, processor, max_length=max_length, skip_bad=run.skip_bad)
    if report.problems:
        metrics.event("data_skipped", f"left out {len(report.problems)} bad sample(s):\n" + "\n".join(map(str, report.problems)),
                      problems=[str(p) for p in report.problems])
    metrics.event("run_start", f"{report.counts()[MULTIMODAL]} multimodal and {report.counts()[LANGUAGE]} language "
                  f"samples; stages {run.stages} on {device} x{d.world}", stages=run.stages, world=d.world,
                  device=str(device), samples=report.counts())

    source: Path | str = base_dir
    done = []
    for stage in run.stages:
        stage_dir = out / f"stage-{stage}"
        if run.resume and is_complete_checkpoint(stage_dir):
            if d.main:
                log(f"stage {stage}: already complete in {stage_dir}, skipped")
            source, done = stage_dir, done + [stage]
            continue
        # A stop that came during the previous stage's last step or its export: that stage is complete.
        stopped_between = _agree(stop.is_set(), d)
        if stopped_between or not _run_stage(stage, source, run, report, processor, base_dir, device, d, metrics,
                                              stop, on_step, log):
            metrics.event("stopped", f"stopped in stage {stage}; --resume continues from the last checkpoint", stage=stage)
            return TrainResult(None, done, stopped=True)
        source, done = stage_dir, done + [stage]
    final = out / "final"
    if d.main:
        tmp = out / f".tmp-final-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, copy_function=_link_or_copy)
        _replace_dir(tmp, final)
    _barrier(d)
    metrics.event("done", f"finished: {final}", final=str(final))
    return TrainResult(final, done)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)  # the final checkpoint is the last stage's: share the files, not the disk space
    except OSError:
        shutil.copy2(src, dst)


def _check_run_file(out: Path, run: RunConfig, d: Dist) -> None:
    """OUT/run.json records the run's settings; --resume refuses to continue a different run."""
    path = out / "run.json"
    fixed = ("model", "data", "text_data", "stages", "overrides", "stage_overrides", "seed", "lora", "qlora")
    if run.resume and path.is_file():
        before = json.loads(path.read_text())
        changed = [k for k in fixed if json.dumps(before.get(k), sort_keys=True) != json.dumps(_jsonable(getattr(run, k)), sort_keys=True)]
        if changed:
            raise TrainingError(f"--resume: {out} was started with other settings ({', '.join(changed)}); "
                                "resume with the same ones or use another --out")
    elif not run.resume and (out / "metrics.jsonl").exists():
        raise TrainingError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if d.main:
        path.write_text(json.dumps(_jsonable(run.to_dict()), indent=1))
    _barrier(d)


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


@dataclass
class StagePlan:
    """What a stage will do, known before any weights load: for the log, and for a UI to show before a start."""

    stage: int
    config: StageConfig  # Table 4 scaled to the data, overrides applied, seq_len grown to fit
    samples: int
    language_share: float  # share of language steps after the modality warm-up
    grown_from: int | None  # the preset sequence length, when the longest sample did not fit it
    longest: str  # file:line of the longest sample
    memory: object | None = None  # memory.MemoryEstimate (with run.check_memory)

    def to_dict(self) -> dict:
        memory = self.memory.to_dict() if self.memory is not None else None
        return {"stage": self.stage, "name": STAGE_NAMES[self.stage], "config": self.config.to_dict(),
                "samples": self.samples, "language_share": self.language_share, "grown_from": self.grown_from,
                "longest": self.longest, "memory": memory}


def plan_stage(stage: int, run: RunConfig, report: datamod.Report, processor: VLChatProcessor, model_config,
               device: torch.device, world: int = 1) -> tuple[StagePlan, list[Encoded]]:
    samples = stage_samples(stage, report)
    if not samples:
        raise TrainingError(f"stage {stage} ({STAGE_NAMES[stage]}) has no data: "
                            + ("it trains the adaptor on image-text conversations" if stage == 1 else "give conversations with --data"))
    overrides = {**run.overrides, **run.stage_overrides.get(stage, run.stage_overrides.get(str(stage), {}))}
    cfg = scaled(stage, len(samples), overrides)
    encoded = [datamod.encode(s, processor, cfg.answers_only) for s in samples]
    longest = max(encoded, key=len)
    grown_from = None
    if len(longest) > cfg.seq_len:  # never cut an image: the length grows to the longest sample
        grown_from, cfg = cfg.seq_len, replace(cfg, seq_len=len(longest))
    n_language = sum(e.modality == LANGUAGE for e in encoded)
    share = cfg.language_ratio if cfg.language_ratio is not None else n_language / len(encoded)
    share = 0.0 if not n_language else 1.0 if n_language == len(encoded) else share
    memory = None
    if run.check_memory:
        from .memory import estimate

        memory = estimate(model_config, stage, cfg, lora=run.lora, qlora=run.qlora, lora_rank=run.lora_rank,
                          gradient_checkpointing=run.gradient_checkpointing, bf16=run.bf16, optimizer=run.optimizer,
                          device=device, world=world)
    return StagePlan(stage, cfg, len(encoded), share, grown_from, longest.source, memory), encoded


def plan(run: RunConfig) -> dict:
    """The data report and every stage's plan (settings, sequence length, memory estimate), loading no weights.
    Raises DataError / TrainingError as `train` would."""
    from ..runtime import pick_device

    base_dir = resolve_directory(run.model)
    model_config, _ = read_config(base_dir)
    processor = VLChatProcessor.from_pretrained(base_dir, num_image_tokens=model_config.num_image_tokens)
    report = datamod.load(run.data, run.text_data, processor, max_length=run.max_length or model_config.max_context,
                          skip_bad=run.skip_bad)
    device = pick_device(run.device)
    return {"data": report.summary(),
            "stages": [plan_stage(s, run, report, processor, model_config, device)[0].to_dict() for s in run.stages]}


def _run_stage(stage, source, run: RunConfig, report, processor, base_dir: Path, device, d: Dist, metrics: Metrics,
               stop, on_step, log) -> bool:
    model_config = read_config(resolve_directory(source))[0]
    stage_plan, encoded = plan_stage(stage, run, report, processor, model_config, device, d.world)
    cfg = stage_plan.config
    if stage_plan.grown_from is not None:
        metrics.event("seq_len", f"stage {stage}: sequence length {stage_plan.grown_from} grows to {cfg.seq_len} to fit "
                      f"{stage_plan.longest} (image tokens + text)", stage=stage, previous=stage_plan.grown_from,
                      seq_len=cfg.seq_len, sample=stage_plan.longest)
    pools = {m: [i for i, e in enumerate(encoded) if e.modality == m] for m in (LANGUAGE, MULTIMODAL)}
    if stage == 2 and not pools[LANGUAGE]:
        metrics.event("warning", "stage 2 has no language data: the paper found language ability collapses "
                      "without it (add --text-data)", stage=stage)
    sampler = Sampler(pools, ModalitySchedule(stage_plan.language_share, cfg.modality_warmup_steps), cfg.batch_size,
                      seed=run.seed * 1000 + stage, grouped=cfg.grouped)
    if cfg.batch_size % d.world:
        raise TrainingError(f"batch size {cfg.batch_size} must be a multiple of the {d.world} processes")
    if stage_plan.memory is not None:  # estimated on every process, so that all of them refuse together
        metrics.event("memory", stage_plan.memory.summary(), stage=stage, **stage_plan.memory.to_dict())
        if not stage_plan.memory.fits:
            raise TrainingError(stage_plan.memory.refusal())
    torch.manual_seed(run.seed * 1000 + stage)  # LoRA initialisation, identical on every process
    model, trainable = prepare_model(source, stage, run, device)
    if d.sharded:
        shard(model)
    params = [p for p in model.parameters() if p.requires_grad]  # in model order: clipping sums their norms
    groups = param_groups(model, cfg)
    optimizer = make_optimizer(groups, cfg, run.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    start = 0
    checkpoint = latest_checkpoint(Path(run.out), stage) if run.resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, sampler, d)
        start = state["step"]
        metrics.truncate(state["metrics_bytes"])
        metrics.event("resume", f"stage {stage}: resumed at step {start} from {checkpoint}", stage=stage, step=start)
    else:
        metrics.event("stage_start", f"stage {stage} ({STAGE_NAMES[stage]}): {cfg.steps} steps of {cfg.batch_size}, "
                      f"lr {cfg.lr:g} {cfg.schedule}"
                      + (f" (vision tower x{cfg.vision_lr_ratio:g})"
                         if cfg.vision_lr_ratio != 1 and any(g["name"] == "vision" for g in groups) else "")
                      + f", {sum(p.numel() for p in params):,} trainable parameters",
                      stage=stage, total_steps=cfg.steps, config=cfg.to_dict(),
                      trainable_parameters=sum(p.numel() for p in params), trainable=len(trainable))
    pad_id = processor.pad_id
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        modality, indices = sampler.draw(step)
        batch = [encoded[i] for i in indices]
        total = max(1, supervised(batch))
        lr = optimizer.param_groups[0]["lr"]
        mine = batch[d.rank::d.world]
        loss_acc = torch.zeros((), device=device)
        for rows in micro_batches(mine, cfg.micro_batch_size, pad_id, cfg.seq_len if cfg.pack else None):
            part = loss_sum(model, rows, processor, device, run.bf16)
            # Sum over this process's tokens / the global batch's: summed over processes, the global mean.
            (part / total * (d.world if d.sharded else 1)).backward()  # FSDP averages what it reduces
            loss_acc += part.detach()
        if d.sharded:
            _all_sum([loss_acc], d)
        else:
            grads = [p.grad if p.grad is not None else p.new_zeros(p.shape) for p in params]
            for p, g in zip(params, grads):
                p.grad = g
            _all_sum(grads + [loss_acc], d)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":  # the step's kernels are only queued yet: time them done, not launched
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        tokens = sum(len(s) for s in batch)
        record = {"type": "step", "stage": stage, "step": step + 1, "total_steps": cfg.steps,
                  "loss": float(loss_acc) / total, "lr": lr, "modality": modality, "tokens": tokens,
                  "supervised_tokens": total, "tokens_per_s": round(tokens / seconds, 1),
                  "grad_norm": float(grad_norm), "seconds": round(seconds, 4)}
        metrics.write(record)
        if on_step:
            on_step(record)
        last = step + 1 == cfg.steps
        if run.eval_every and (step + 1) % run.eval_every == 0 and not last:
            _evaluate(model, processor, run, stage, step + 1, metrics, d)
        stopping = _agree(stop.is_set(), d) and not last
        if (run.save_every and (step + 1) % run.save_every == 0 and not last) or stopping:
            trained, optimizer_state = full_state(model, optimizer, d)
            if d.main:
                path = save_checkpoint(Path(run.out), stage, step + 1, trained, optimizer_state, scheduler, sampler,
                                       cfg, metrics.size(), run.keep_checkpoints)
                metrics.event("checkpoint", stage=stage, step=step + 1, path=str(path))
            _barrier(d)
        if stopping:
            return False
    _evaluate(model, processor, run, stage, cfg.steps, metrics, d)
    weights = full_state(model, None, d)[0] if d.sharded else None
    if d.main:
        export(model, base_dir, Path(run.out) / f"stage-{stage}", weights)
    _barrier(d)
    metrics.event("stage_end", f"stage {stage} done: {Path(run.out) / f'stage-{stage}'}", stage=stage,
                  path=str(Path(run.out) / f"stage-{stage}"))
    return True


def _evaluate(model, processor, run: RunConfig, stage: int, step: int, metrics: Metrics, d: Dist) -> None:
    if not (run.eval_mc or run.eval_text) or not (d.main or d.sharded):  # sharded: every process takes part
        return
    from .evaluate import evaluate

    model.eval()
    result = evaluate(model, processor, mc=run.eval_mc, text=run.eval_text)
    model.train()
    metrics.write({"type": "eval", "stage": stage, "step": step, **result})
