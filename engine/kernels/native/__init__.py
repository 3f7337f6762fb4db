"""Native kernels, compiled on first use with the system C compiler: decode_kernels.c (one-row products and the
rest of a decoded token) and gemm.c (many-row products: prefill, image encoding).

Optional by design: where there is no x86-64 CPU with AVX2 + FMA, no C compiler, or DSVL_NATIVE=0 is set,
`kernels()` returns None and callers use their PyTorch path. `status()` says which and why.

The shared library is cached under the user's cache directory, keyed by a hash of the source and the compile
command, and written atomically, so concurrent first uses (several test processes) do not race.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("decode_kernels.c", "gemm.c")]
HEADERS = [Path(__file__).with_name("common.h")]
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c11"]

_lock = threading.Lock()
_state: dict = {}  # "lib": ctypes.CDLL | None, "reason": str
_off = threading.local()  # set by `disabled()`: this thread uses the PyTorch paths


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deepseek-vl-local" / "native"


def _cpu_supported() -> str | None:
    """None if the CPU can run the kernels, else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernels are written for x86-64 (this is {platform.machine()})"
    try:
        flags = set()
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return "cannot read /proc/cpuinfo to check for AVX2 + FMA"
    missing = {"avx2", "fma"} - flags
    return f"the CPU lacks {', '.join(sorted(missing))}" if missing else None


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(compiler: str) -> Path:
    """The shared library of the sources, compiled once per source text."""
    text = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(text + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / f"dsvl_kernels-{key}.so"  # the decode kernels and the GEMM
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[:500]}")
        os.replace(tmp, target)  # atomic: another process sees the old state or the whole library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.dsvl_gemv.argtypes = [i, i, p, p, p, p, p, i, p, i, i, i, i]
    lib.dsvl_gemv.restype = i
    lg = ctypes.c_long
    lib.dsvl_attend_decode.argtypes = [p, p, lg, lg, p, lg, lg, p, i, i, i, i, ctypes.c_float, i, i]
    lib.dsvl_attend_decode.restype = i
    lib.dsvl_dequantize_nf4.argtypes = [p, p, p, p, lg, i, i]
    lib.dsvl_dequantize_nf4.restype = None
    lib.dsvl_rmsnorm.argtypes = [p, p, p, i, ctypes.c_float, i]
    lib.dsvl_rmsnorm.restype = None
    lib.dsvl_rotary.argtypes = [p, i, p, i, p, p, i, i]
    lib.dsvl_rotary.restype = None
    lib.dsvl_decode_layer.argtypes = [p, p, p, ctypes.c_float, i, p, p, p, p, p, p, p, i, i, i, i, i, i, i,
                                      ctypes.c_float, i, i]
    lib.dsvl_decode_layer.restype = i
    lib.dsvl_gemm.argtypes = [i, p, p, p, p, i, i, i, p, i, p, i, i]
    lib.dsvl_gemm.restype = i
    lib.dsvl_bf16_dot.argtypes = []
    lib.dsvl_bf16_dot.restype = i
    return lib


@contextlib.contextmanager
def disabled():
    """Use the PyTorch paths in this thread for a while (benchmarks compare the two; tests check fallbacks)."""
    before = getattr(_off, "value", False)
    _off.value = True
    try:
        yield
    finally:
        _off.value = before


def kernels() -> ctypes.CDLL | None:
    """The loaded library, or None (see `status()`); built once per process."""
    if getattr(_off, "value", False):
        return None
    if "reason" in _state:  # the hot path (hundreds of calls per token): decided already, no lock needed
        return _state["lib"]
    return _decide()


def _decide() -> ctypes.CDLL | None:
    with _lock:
        if "reason" not in _state:
            lib = None
            if os.environ.get("DSVL_NATIVE", "1") == "0":
                reason = "disabled by DSVL_NATIVE=0"
            elif cpu := _cpu_supported():
                reason = cpu
            elif not (cc := compiler()):
                reason = "no C compiler (cc or gcc) on PATH"
            else:
                try:
                    lib, reason = _bind(ctypes.CDLL(str(_build(cc)))), "loaded"
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    reason = f"build failed: {e}"
            _state["lib"] = lib
            _state["reason"] = reason  # last: the lock-free check in kernels() looks for it
        return _state["lib"]


def status() -> str:
    """'loaded', or why the PyTorch fallbacks are used (in this process; `disabled()` is per thread)."""
    _decide()
    return _state["reason"]


def reset() -> None:
    """Decide again at the next use (tests change DSVL_NATIVE); a built library stays cached on disk."""
    with _lock:
        _state.clear()


# These checks run a few hundred times per token: `is_cpu` rather than `device.type` (0.1 vs 0.5 µs), loops
# rather than generators.
def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)  # the kernels have no backward


def _one_row(x: torch.Tensor, K: int) -> bool:
    return (x.is_cpu and x.dtype in (torch.bfloat16, torch.float32) and x.numel() == K and x.is_contiguous()
            and not _needs_grad(x))


# ------------------------------------------------------------------ matrix-vector products
BF16, INT8, NF4 = 0, 1, 2  # the weight formats dsvl_gemv reads
_FORMAT = {BF16: (torch.bfloat16, 16), INT8: (torch.int8, 32), NF4: (torch.uint8, 64)}  # data dtype, K multiple


class Weight(NamedTuple):
    """A weight matrix [rows, cols] in a format the native matrix-vector kernel reads."""

    kind: int  # BF16, INT8 or NF4
    data: torch.Tensor  # bf16 [rows, cols]; int8 [rows, cols]; NF4: uint8 [rows·cols/2], first element high nibble
    rows: int
    cols: int
    scale: torch.Tensor | None = None  # INT8: fp32 [rows], one per row; NF4: fp32 absmax [rows·cols/64]
    levels: torch.Tensor | None = None  # NF4: the 16 levels; int8 round(level·127) for gemv, fp32 for gemm


def _readable(w: Weight, levels: torch.dtype = torch.int8) -> bool:
    dtype, multiple = _FORMAT[w.kind]
    numel = w.rows * w.cols // (2 if w.kind == NF4 else 1)
    ok = (w.data.dtype == dtype and w.data.is_cpu and w.data.is_contiguous()
          and w.data.numel() == numel and w.cols % multiple == 0 and not _needs_grad(w.data))
    if ok and w.kind != BF16:
        scales = w.rows if w.kind == INT8 else w.rows * w.cols // 64
        ok = w.scale.dtype == torch.float32 and w.scale.is_contiguous() and w.scale.numel() == scales
    if ok and w.kind == NF4:
        ok = w.levels.dtype == levels and w.levels.numel() == 16
    return ok


def _pointers(weights: Sequence[Weight]) -> tuple:
    """The weights' data, scale and levels addresses as three C arrays (NULL where a format has none)."""
    P = ctypes.c_void_p * len(weights)
    return (P(*(w.data.data_ptr() for w in weights)),
            P(*(w.scale.data_ptr() if w.scale is not None else None for w in weights)),
            P(*(w.levels.data_ptr() if w.levels is not None else None for w in weights)))


def gemv(x: torch.Tensor, weights: Sequence[Weight], swiglu: bool = False) -> list[torch.Tensor] | torch.Tensor | None:
    """x [..., K] holding one row times each weight [N_i, K] (all of one kind) → [x @ W_iᵀ [..., N_i]], in x's
    dtype, from one native call that prepares x once. With swiglu (two weights, gate and up, of one shape):
    silu(x @ gateᵀ) · (x @ upᵀ) alone. None if not applicable."""
    lib = kernels()
    if lib is None or not weights or (swiglu and (len(weights) != 2 or weights[0].rows != weights[1].rows)):
        return None
    kind, K = weights[0].kind, weights[0].cols
    if not _one_row(x, K) or not all(w.kind == kind and w.cols == K and _readable(w) for w in weights):
        return None
    ys = [x.new_empty(*x.shape[:-1], w.rows) for w in (weights[:1] if swiglu else weights)]
    n = len(weights)
    bf16 = int(x.dtype == torch.bfloat16)
    if lib.dsvl_gemv(kind, n, *_pointers(weights), (ctypes.c_int * n)(*(w.rows for w in weights)), x.data_ptr(),
                     bf16, (ctypes.c_void_p * len(ys))(*(y.data_ptr() for y in ys)), bf16, K, int(swiglu),
                     torch.get_num_threads()):
        raise MemoryError("gemv: out of memory")
    return ys[0] if swiglu else ys


# ------------------------------------------------------------------ matrix-matrix products
def gemm(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [..., K] (several rows, bf16 or fp32) times w [N, K] (NF4 levels in fp32) plus bias [N] → [..., N] in x's
    dtype, computed in fp32 (gemm.c); None if not applicable (autograd, another device, over 2³¹ elements)."""
    lib = kernels()
    if lib is None or not x.is_cpu or x.dtype not in (torch.bfloat16, torch.float32) or x.shape[-1] != w.cols:
        return None
    N, K = w.rows, w.cols
    M = x.numel() // K
    if (not _readable(w, torch.float32) or max(M * K, M * N, N * K) >= 2**31 or _needs_grad(x)
            or (bias is not None and (bias.numel() != N or not bias.is_cpu or _needs_grad(bias)))):
        return None
    rows = x.reshape(M, K).contiguous()
    out = x.new_empty(*x.shape[:-1], N)
    bias = None if bias is None else bias.float().contiguous()
    bf16 = int(x.dtype == torch.bfloat16)
    if lib.dsvl_gemm(w.kind, w.data.data_ptr(), None if w.scale is None else w.scale.data_ptr(),
                     None if w.levels is None else w.levels.data_ptr(), None if bias is None else bias.data_ptr(),
                     M, N, K, rows.data_ptr(), bf16, out.data_ptr(), bf16, torch.get_num_threads()):
        raise MemoryError("gemm: out of memory")
    return out


def bf16_dot() -> bool:
    """True where the bf16 GEMV multiplies with AVX512_BF16's vdpbf16ps (the library decides: CPU and
    DSVL_NO_AVX512)."""
    lib = kernels()
    return lib is not None and bool(lib.dsvl_bf16_dot())


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, out: torch.Tensor) -> bool:
    """Writes into out (fp32 or bf16, contiguous) the weights of packed NF4 codes, absmax per 64 and the 16 fp32
    levels; False, leaving out alone, if not applicable."""
    lib = kernels()
    numel = out.numel()
    if (lib is None or numel % 2 or packed.numel() * 2 < numel or packed.device.type != "cpu"
            or out.device.type != "cpu" or out.dtype not in (torch.float32, torch.bfloat16)
            or not (packed.is_contiguous() and absmax.is_contiguous() and out.is_contiguous())):
        return False
    lib.dsvl_dequantize_nf4(packed.data_ptr(), absmax.data_ptr(), levels.data_ptr(), out.data_ptr(), numel,
                            out.dtype == torch.bfloat16, torch.get_num_threads())
    return True


def attend_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | None:
    """One new token's attention, batch 1, no mask: q [1, H, 1, D], k and v [1, Hkv, S, D] (as the KV cache
    hands them back: k rows contiguous, v a transposed view whose positions are contiguous) → [1, 1, H·D]
    in q's dtype; None if not applicable."""
    lib = kernels()
    if lib is None or not q.is_cpu or q.dtype not in (torch.bfloat16, torch.float32):
        return None
    _, H, T, D = q.shape
    B, Hkv, S, _ = k.shape
    if (B != 1 or T != 1 or H % Hkv or D % 8 or k.dtype != q.dtype or v.dtype != q.dtype or v.shape != k.shape
            or k.stride(-1) != 1 or v.stride(-2) != 1 or not q.is_contiguous() or _needs_grad(q, k, v)):
        return None
    out = q.new_empty(1, 1, H * D)
    if lib.dsvl_attend_decode(q.data_ptr(), k.data_ptr(), k.stride(1), k.stride(2), v.data_ptr(), v.stride(1),
                              v.stride(3), out.data_ptr(), H, Hkv, D, S, scale, int(q.dtype == torch.bfloat16),
                              torch.get_num_threads()):
        raise MemoryError("attend_decode: out of memory")
    return out


def _same_cpu_dtype(*tensors: torch.Tensor) -> bool:
    dtype = tensors[0].dtype
    if dtype not in (torch.bfloat16, torch.float32):
        return False
    for t in tensors:
        if t.dtype != dtype or not t.is_cpu or not t.is_contiguous():
            return False
    return not _needs_grad(*tensors)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """Llama's RMSNorm of one vector x [..., K] (one row in all); None if not applicable."""
    lib = kernels()
    K = weight.numel()
    if lib is None or x.numel() != K or not _same_cpu_dtype(x, weight):
        return None
    out = torch.empty_like(x)
    lib.dsvl_rmsnorm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), K, eps, int(x.dtype == torch.bfloat16))
    return out


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """In place, x ← x·cos + rotate_half(x)·sin for queries q [1, H, 1, D] and keys k [1, Hkv, 1, D] with cos, sin
    [1, 1, 1, D]; False, changing nothing, if not applicable."""
    lib = kernels()
    D = q.shape[-1]
    if (lib is None or q.dim() != 4 or k.dim() != 4 or q.shape[0] != 1 or q.shape[2] != 1 or k.shape[0] != 1
            or k.shape[2] != 1 or k.shape[3] != D or D % 2 or cos.numel() != D or sin.numel() != D
            or not _same_cpu_dtype(q, k, cos, sin)):
        return False
    lib.dsvl_rotary(q.data_ptr(), q.shape[1], k.data_ptr(), k.shape[1], cos.data_ptr(), sin.data_ptr(), D,
                    int(q.dtype == torch.bfloat16))
    return True



def decode_layer(x: torch.Tensor, norms: tuple[torch.Tensor, torch.Tensor], eps: float, weights: Sequence[Weight],
                 cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: int,
                 heads: int, scale: float) -> torch.Tensor | None:
    """One token through a LLaMA decoder layer: x [1, 1, C] → the layer's output (a new tensor), with the token's
    keys and values written into the layer's KV cache buffers at pos (keys [1, Hkv, cap, D], values transposed
    [1, Hkv, D, cap]). norms: the two RMSNorm weights [C]; weights: q, k, v, o, gate, up, down, of one kind;
    cos, sin [D] at the token's position. None, changing nothing, if not applicable."""
    lib = kernels()
    if lib is None or len(weights) != 7:
        return None
    _, kv_heads, cap, D = keys.shape
    C, I, kind = x.shape[-1], weights[4].rows, weights[0].kind
    rows, cols = (heads * D, kv_heads * D, kv_heads * D, C, I, I, C), (C, C, C, heads * D, C, C, I)
    if (D % 8 or heads % kv_heads or not 0 <= pos < cap or values.shape != (1, kv_heads, D, cap)
            or cos.numel() != D or sin.numel() != D or not _one_row(x, C)
            or not _same_cpu_dtype(x, *norms, cos, sin, keys, values)
            or any(w.kind != kind or (w.rows, w.cols) != shape or not _readable(w)
                   for w, shape in zip(weights, zip(rows, cols)))):
        return None
    y = x.clone()
    if lib.dsvl_decode_layer(y.data_ptr(), norms[0].data_ptr(), norms[1].data_ptr(), eps, kind, *_pointers(weights),
                             cos.data_ptr(), sin.data_ptr(), keys.data_ptr(), values.data_ptr(), cap, pos, heads,
                             kv_heads, D, C, I, scale, int(x.dtype == torch.bfloat16), torch.get_num_threads()):
        raise MemoryError("decode_layer: out of memory")
    return y
