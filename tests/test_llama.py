"""engine/model/llama.py against transformers' LlamaForCausalLM on the same random tiny weights (fp32)."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from engine.model.llama import KVCache, LlamaForCausalLM

TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: thread hand-offs cost more than the maths, and far more on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relative_error(actual, expected) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def config(kv_heads=4, **overrides) -> LlamaConfig:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=kv_heads, max_position_embeddings=256, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
    return LlamaConfig(**{**base, **overrides})


def pair(cfg):
    """(ours, HF) with identical weights; norms perturbed so a swapped weight would show."""
    torch.manual_seed(0)
    hf = HFLlama(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    ours = LlamaForCausalLM(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours, hf


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def models(request):
    return pair(config(kv_heads=request.param))


def left_padded_batch(vocab=97):
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids[mask == 0] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def test_state_dict_keys_equal_hf():
    ours, hf = pair(config())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}


@torch.no_grad()
def test_left_padded_forward(models):
    ours, hf = models
    ids, mask, pos = left_padded_batch()
    a = ours(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    b = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert relative_error(a[real], b[real]) < TOLERANCE
    assert torch.isfinite(a).all()  # padding rows included: no NaN from all-masked rows


@torch.no_grad()
def test_unpadded_forward_and_logits_to_keep(models):
    ours, hf = models
    ids = torch.randint(0, 97, (2, 9))
    full = hf(input_ids=ids).logits
    assert relative_error(ours(input_ids=ids).logits, full) < TOLERANCE
    assert relative_error(ours(input_ids=ids, logits_to_keep=1).logits, full[:, -1:]) < TOLERANCE
    keep = torch.tensor([0, 4])
    assert relative_error(ours(input_ids=ids, logits_to_keep=keep).logits, full[:, keep]) < TOLERANCE


@torch.no_grad()
def test_incremental_decode_equals_full_recompute(models):
    ours, _ = models
    ids = torch.randint(0, 97, (1, 20))
    full = ours(input_ids=ids).logits
    cache = KVCache(capacity=4)  # small, so decoding crosses several doublings
    out = ours(input_ids=ids[:, :7], cache=cache, use_cache=True)
    steps = [out.logits[:, -1]]
    for t in range(7, 20):
        pos = cache.get_seq_length()
        assert pos == t
        out = ours(input_ids=ids[:, t:t + 1], position_ids=torch.tensor([[pos]]), cache=cache, use_cache=True)
        steps.append(out.logits[:, -1])
    assert cache.capacity >= 20 and cache.get_seq_length() == 20
    assert relative_error(torch.stack(steps, 1), full[:, 6:]) < TOLERANCE


@torch.no_grad()
def test_left_padded_batch_decode(models):
    """Batched decode with a growing 2-D mask and explicit positions, against HF + DynamicCache."""
    ours, hf = models
    ids, mask, pos = left_padded_batch()
    ours_cache, hf_cache = KVCache(), DynamicCache(config=hf.config)
    a = ours(input_ids=ids, attention_mask=mask, position_ids=pos, cache=ours_cache, use_cache=True).logits[:, -1]
    b = hf(input_ids=ids, attention_mask=mask, position_ids=pos, cache=hf_cache, use_cache=True).logits[:, -1]
    next_pos = pos[:, -1:] + 1
    for _ in range(4):
        assert relative_error(a, b) < TOLERANCE
        token = b.argmax(-1, keepdim=True)  # [B, 1]
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        step = dict(input_ids=token, attention_mask=mask, position_ids=next_pos, use_cache=True)
        a = ours(**step, cache=ours_cache).logits[:, -1]
        b = hf(**step, cache=hf_cache).logits[:, -1]
        next_pos = next_pos + 1
    assert relative_error(a, b) < TOLERANCE


@torch.no_grad()
def test_crop_then_prefill_equals_fresh(models):
    ours, _ = models
    ids = torch.randint(0, 97, (1, 16))
    other = torch.randint(0, 97, (1, 6))
    cache = KVCache(capacity=8)
    ours(input_ids=ids, cache=cache, use_cache=True)
    cache.crop(10)  # keep a 10-token prefix, then continue differently
    assert cache.get_seq_length() == 10
    resumed = ours(input_ids=other, position_ids=torch.arange(10, 16)[None], cache=cache, use_cache=True).logits
    fresh = ours(input_ids=torch.cat([ids[:, :10], other], 1)).logits[:, 10:]
    assert relative_error(resumed, fresh) < TOLERANCE
    cache.crop(-3)  # transformers 5 style: drop the last 3
    assert cache.get_seq_length() == 13
    step = ours(input_ids=other[:, 3:4], cache=cache, use_cache=True).logits[:, -1]
    assert relative_error(step, fresh[:, 3]) < TOLERANCE


@torch.no_grad()
def test_transformers_dynamic_cache_works(models):
    ours, _ = models
    ids = torch.randint(0, 97, (1, 8))
    cache = DynamicCache()
    ours(input_ids=ids[:, :5], cache=cache, use_cache=True)
    cache.crop(-1)
    a = ours(input_ids=ids[:, 4:], cache=cache, use_cache=True).logits
    assert relative_error(a, ours(input_ids=ids).logits[:, 4:]) < TOLERANCE


def test_labels_loss_and_gradients_equal_hf(models):
    ours, hf = models
    ids, mask, pos = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    a = ours(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
    b = hf(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
    assert abs(a.loss.item() - b.loss.item()) < TOLERANCE * b.loss.item()
    a.loss.backward()
    b.loss.backward()
    ga = dict(ours.named_parameters())["model.layers.0.self_attn.q_proj.weight"].grad
    gb = dict(hf.named_parameters())["model.layers.0.self_attn.q_proj.weight"].grad
    assert relative_error(ga, gb) < 1e-4
    ours.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)


@torch.no_grad()
def test_bf16_decode_close_to_hf():
    ours, hf = pair(config())
    ours, hf = ours.to(torch.bfloat16), hf.to(torch.bfloat16)
    ids = torch.randint(0, 97, (1, 12))
    cache = KVCache()
    ours(input_ids=ids[:, :11], cache=cache, use_cache=True)
    a = ours(input_ids=ids[:, 11:], cache=cache, use_cache=True).logits.float()
    b = hf(input_ids=ids).logits[:, -1:].float()
    assert relative_error(a, b) < 3e-2


def test_tied_embeddings():
    ours, hf = pair(config(tie_word_embeddings=True))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        assert relative_error(ours(input_ids=ids).logits, hf(input_ids=ids).logits) < TOLERANCE
