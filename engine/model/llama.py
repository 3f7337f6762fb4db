"""The LLaMA causal LM of DeepSeek-VL, in one file: a drop-in for transformers' `LlamaForCausalLM`.

Same module tree, so the official checkpoint keys load unchanged:

    model.embed_tokens                        [V, C]
    model.layers[i].input_layernorm           [C]
    model.layers[i].self_attn.{q,k,v,o}_proj  [H*D, C], [Hkv*D, C] x2, [C, H*D]
    model.layers[i].post_attention_layernorm  [C]
    model.layers[i].mlp.{gate,up,down}_proj   [I, C] x2, [C, I]
    model.norm                                [C]
    lm_head                                   [V, C]

Written for CPU decoding (one token at a time, batch 1): the KV cache is preallocated and grows by doubling
instead of concatenating every step, and the lm_head runs only on the positions asked for. RMSNorm, rotary and
attention call `engine/kernels`, which picks a native C kernel or PyTorch for each (one place for that choice). The maths follows transformers' Llama exactly (float32 RMS
statistics, float32 rotary angles cast to the model dtype, HF's rotate_half convention), so logits match it.

Shapes: B batch, T new tokens, S tokens attended to (cached + new), C hidden, H query heads, Hkv key/value
heads, G = H / Hkv queries per key/value head, D head dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels


# ------------------------------------------------------------------ KV cache
class KVCache:
    """Keys and values of every layer in preallocated buffers that double when full.

    `update` writes the new positions in place and returns views of the filled part, so a decode step
    allocates nothing (except at the rare doublings). Keys are stored [B, Hkv, capacity, D]; values
    transposed, [B, Hkv, D, capacity], because then both decode matmuls (q·Kᵀ and p·V) read their matrix
    row-major, which is the fast bf16 matrix-vector path on CPU (p·V on [S, D] values is ~5x slower).
    `update` still returns v as a [B, Hkv, S, D] view. Same interface as transformers' caches where this
    project uses them: `update(k, v, layer_idx)`, `get_seq_length()`, `crop(n)`.
    """

    def __init__(self, capacity: int = 256):
        self.initial_capacity = capacity  # tokens allocated at the first update (doubled until the prompt fits)
        self.keys: list[torch.Tensor] = []  # per layer [B, Hkv, capacity, D]
        self.values: list[torch.Tensor] = []  # per layer [B, Hkv, D, capacity]
        self.lengths: list[int] = []  # filled positions per layer

    def __len__(self) -> int:
        return len(self.keys)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx] if layer_idx < len(self.lengths) else 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        """k, v: [B, Hkv, T, D] for the next T positions; returns this layer's k, v [B, Hkv, S, D] (views)."""
        if layer_idx == len(self.keys):  # first call for this layer: nothing allocated yet
            self.keys.append(k.new_empty(0, 0, 0, 0))
            self.values.append(v.new_empty(0, 0, 0, 0))
            self.lengths.append(0)
        start = self.lengths[layer_idx]
        end = start + k.shape[2]
        if end > self.keys[layer_idx].shape[2]:
            self._grow(layer_idx, k, end)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[:, :, start:end] = k
        values[:, :, :, start:end] = v.transpose(-2, -1)
        self.lengths[layer_idx] = end
        return keys[:, :, :end], values[:, :, :, :end].transpose(-2, -1)

    def slot(self, layer_idx: int):
        """(keys, values, position) where one more token of the layer goes, the buffers grown if full, for a
        writer that fills them itself (the native decoder layer) and then calls `advance`; None while the layer
        has no buffers yet."""
        if layer_idx >= len(self.keys) or not self.keys[layer_idx].numel():
            return None
        pos = self.lengths[layer_idx]
        if pos >= self.keys[layer_idx].shape[2]:
            self._grow(layer_idx, self.keys[layer_idx], pos + 1)
        return self.keys[layer_idx], self.values[layer_idx], pos

    def advance(self, layer_idx: int):
        self.lengths[layer_idx] += 1

    def _grow(self, layer_idx: int, k: torch.Tensor, needed: int):
        # Doubling keeps the copying amortised O(1) per token.
        old_k, old_v, n = self.keys[layer_idx], self.values[layer_idx], self.lengths[layer_idx]
        cap = max(self.initial_capacity, 2 * old_k.shape[2], 1)
        while cap < needed:
            cap *= 2
        B, Hkv, _, D = k.shape
        self.keys[layer_idx] = k.new_empty(B, Hkv, cap, D)
        self.values[layer_idx] = k.new_empty(B, Hkv, D, cap)
        if n:
            self.keys[layer_idx][:, :, :n] = old_k[:, :, :n]
            self.values[layer_idx][..., :n] = old_v[..., :n]

    def crop(self, n: int):
        """Keep the first n positions (n ≥ 0), or drop the last -n (n < 0, as transformers 5's caches do).
        Memory is kept; the next update overwrites the dropped positions."""
        length = self.get_seq_length()
        keep = n if n >= 0 else max(0, length + n)
        self.lengths = [min(length_i, keep) for length_i in self.lengths]

    def reset(self):
        self.crop(0)


# ------------------------------------------------------------------ building blocks
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rmsnorm(x, self.weight, self.eps)  # float32 statistics, as HF


class Rotary:
    """RoPE angles. Not an nn.Module with a buffer: the inverse frequencies are recomputed per device, so a
    model built on the meta device (as the loader does) needs no buffer fix-up."""

    def __init__(self, head_dim: int, theta: float):
        self.head_dim = head_dim
        self.theta = theta
        self._inv_freq: torch.Tensor | None = None

    def inv_freq(self, device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            # Exactly HF's expression, computed on the CPU in float32.
            inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))
            self._inv_freq = inv.to(device)
        return self._inv_freq  # [D/2]

    def __call__(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids [B, T] → cos, sin [B, T, D] in the model dtype."""
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)  # [B, T, D/2] float32
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.scale = self.head_dim**-0.5
        bias = getattr(config, "attention_bias", False)
        C, D = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(C, self.n_heads * D, bias=bias)
        self.k_proj = nn.Linear(C, self.n_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(C, self.n_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * D, C, bias=bias)

    def forward(self, x, cos, sin, mask, cache):
        """x [B, T, C]; cos, sin [B, 1, T, D]; mask: (allowed, empty) from LlamaModel._mask, or None."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = kernels.linears(x, self.q_proj, self.k_proj, self.v_proj)  # decoding: one native call
        q = q.view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(B, T, Hkv, D).transpose(1, 2)  # [B, Hkv, T, D]
        q, k = kernels.rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, Hkv, S, D]
        y = kernels.attend(q, k, v, self.scale, mask)  # [B, T, H·D]
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
            raise NotImplementedError(f"hidden_act {config.hidden_act!r}: only SiLU (SwiGLU) is implemented")
        bias = getattr(config, "mlp_bias", False)
        C, I = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(C, I, bias=bias)
        self.up_proj = nn.Linear(C, I, bias=bias)
        self.down_proj = nn.Linear(I, C, bias=bias)

    def forward(self, x):
        return self.down_proj(kernels.swiglu(x, self.gate_proj, self.up_proj))  # SwiGLU: silu(gate(x)) · up(x)


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        if (y := kernels.decoder_layer(self, x, cos, sin, mask, cache)) is not None:
            return y  # one decoded token: the same steps as below, in one native call
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# ------------------------------------------------------------------ the model
class LlamaModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, getattr(config, "pad_token_id", None))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        rope = dict(getattr(config, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(f"rope_type {rope['rope_type']!r}: only the default RoPE is implemented")
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        self.rotary = Rotary(self.layers[0].self_attn.head_dim, theta)

    @staticmethod
    def _mask(attention_mask, B, T, past, device):
        """Which keys each query may see, or None when the attention kernels need no mask.

        attention_mask: [B, S] (1 real, 0 padding) over cached + new positions, S = past + T, or None.
        Returns None, or (allowed [B or 1, 1, T, S] bool, empty [B, 1, T, 1] bool or None). Causality is by
        cache index (not position id), like HF. A query with no real key to see (left padding) is let see
        itself, so SDPA gives no NaN, and its output is zeroed afterwards: what HF's attention gives there.
        """
        S = past + T
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask.bool(), None  # ready [B, 1, T, S]: packed training rows (block-diagonal)
        if attention_mask is not None:
            if attention_mask.shape[-1] != S:
                raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions; cache + input has {S}")
            if bool(attention_mask.all()):
                attention_mask = None
        if attention_mask is None and (T == 1 or past == 0):
            return None  # decode sees everything; a fresh prefill uses SDPA's is_causal
        q_idx = torch.arange(past, S, device=device)[:, None]  # [T, 1]
        k_idx = torch.arange(S, device=device)[None, :]  # [1, S]
        allowed = (k_idx <= q_idx)[None, None]  # [1, 1, T, S]
        if attention_mask is None:
            return allowed, None
        allowed = allowed & attention_mask.bool()[:, None, None, :]  # [B, 1, T, S]
        empty = ~allowed.any(-1, keepdim=True)  # [B, 1, T, 1]
        return allowed | (empty & (k_idx == q_idx)), empty

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, cache=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, C]
        B, T, _ = x.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None]  # [1, T]
        cos, sin = self.rotary(position_ids, x.dtype)  # [B or 1, T, D]
        cos, sin = cos[:, None], sin[:, None]  # [B or 1, 1, T, D]: broadcast over heads
        mask = self._mask(attention_mask, B, T, past, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, kept positions, V]
    loss: torch.Tensor | None = None
    cache: object | None = None

    @property
    def past_key_values(self):  # the transformers 4 name
        return self.cache


class LlamaForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def new_cache(self, capacity: int = 256) -> KVCache:
        return KVCache(capacity)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # [B, T]
        inputs_embeds: torch.Tensor | None = None,  # [B, T, C]
        attention_mask: torch.Tensor | None = None,  # [B, past + T]
        position_ids: torch.Tensor | None = None,  # [B, T]
        cache=None,  # KVCache (or any cache with transformers' update/get_seq_length interface)
        use_cache: bool = False,
        logits_to_keep: int | torch.Tensor = 0,  # int k: last k positions (0: all); tensor: these positions
        labels: torch.Tensor | None = None,  # [B, T]; -100 is ignored
    ) -> CausalLMOutput:
        if use_cache and cache is None:
            cache = KVCache()
        h = self.model(input_ids, inputs_embeds, attention_mask, position_ids, cache)  # [B, T, C]
        # The lm_head is V x C (0.4 GB for the 1.3B): only project the positions the caller needs.
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)  # [B, kept, V]
        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need logits for every position (logits_to_keep=0)")
            # Position t predicts token t+1; float32 cross entropy, mean over non-ignored targets (as HF).
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutput(logits=logits, loss=loss, cache=cache)
