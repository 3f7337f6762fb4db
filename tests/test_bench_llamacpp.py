"""benchmarks/bench_llamacpp.py writes the benchmark LLaMA as GGUF files that hold exactly its weights.

Runs the script's `--smoke --gguf-only` (no llama.cpp needed) and reads the files back with gguf's own
GGUFReader: metadata, vocabulary, every tensor's name, shape, type and values against the seeded model.
"""

import subprocess
import sys

import torch

from conftest import REPO, require_module

gguf = require_module("gguf")

from benchmarks.bench_decode import build  # noqa: E402
from benchmarks.bench_llamacpp import SMOKE_CONFIG  # noqa: E402

LAYER_TENSORS = {  # llama.cpp's names for HF's
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_rows_for_gguf(n_rows: int, n_head: int) -> torch.Tensor:
    """Which HF row each GGUF q/k row holds: llama.cpp rotates adjacent pairs (2i, 2i+1) of a head, HF rotates
    i with i + head_dim/2, so GGUF row 2i is HF row i and row 2i+1 is HF row i + head_dim/2."""
    head_dim = n_rows // n_head
    rows = []
    for h in range(n_head):
        for i in range(head_dim // 2):
            rows += [h * head_dim + i, h * head_dim + i + head_dim // 2]
    return torch.tensor(rows)


def test_smoke_gguf_round_trip(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_llamacpp.py"), "--smoke", "--gguf-only",
                           "--gguf-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    cfg = SMOKE_CONFIG
    hf, _ = build(config=cfg)  # seeded: the weights the script wrote
    state = hf.state_dict()
    expected = {"token_embd.weight": state["model.embed_tokens.weight"],
                "output_norm.weight": state["model.norm.weight"], "output.weight": state["lm_head.weight"]}
    for layer in range(cfg["num_hidden_layers"]):
        for name, hf_name in LAYER_TENSORS.items():
            expected[f"blk.{layer}.{name}.weight"] = state[f"model.layers.{layer}.{hf_name}.weight"]

    for ftype, dtype in (("F16", torch.float16), ("BF16", torch.bfloat16)):
        reader = gguf.GGUFReader(tmp_path / f"smoke-{ftype}.gguf")
        field = lambda key: reader.fields[key].contents()  # noqa: E731
        assert field("general.architecture") == "llama"
        assert field("general.file_type") == {"F16": 1, "BF16": 32}[ftype]
        assert field("llama.block_count") == cfg["num_hidden_layers"]
        assert field("llama.embedding_length") == cfg["hidden_size"]
        assert field("llama.feed_forward_length") == cfg["intermediate_size"]
        assert field("llama.attention.head_count") == cfg["num_attention_heads"]
        assert field("llama.attention.head_count_kv") == cfg["num_key_value_heads"]
        assert field("llama.rope.dimension_count") == cfg["hidden_size"] // cfg["num_attention_heads"]
        assert field("llama.rope.freq_base") == cfg["rope_parameters"]["rope_theta"]
        assert abs(field("llama.attention.layer_norm_rms_epsilon") - cfg["rms_norm_eps"]) < 1e-12
        assert field("tokenizer.ggml.model") == "llama"
        tokens = field("tokenizer.ggml.tokens")
        assert len(tokens) == len(set(tokens)) == cfg["vocab_size"] == len(field("tokenizer.ggml.token_type"))
        assert tokens[3 + 0x0A] == "<0x0A>"  # llama.cpp looks up the newline byte token when it loads

        assert sorted(t.name for t in reader.tensors) == sorted(expected)
        for tensor in reader.tensors:
            want = expected[tensor.name]
            if tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = cfg["num_attention_heads" if "attn_q" in tensor.name else "num_key_value_heads"]
                want = want[hf_rows_for_gguf(want.shape[0], heads)]
            assert list(tensor.shape) == list(reversed(want.shape)), tensor.name  # GGUF lists the fastest dim first
            norm = want.ndim == 1
            assert tensor.tensor_type == (gguf.GGMLQuantizationType.F32 if norm else gguf.GGMLQuantizationType[ftype])
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # float32, whatever the stored type
            values = torch.from_numpy(values.copy()).reshape(want.shape)
            assert torch.equal(values, want.float() if norm else want.to(dtype).float()), tensor.name
