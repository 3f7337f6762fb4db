"""Loading: sharded and .bin checkpoints, strict key checks, and clear errors for broken checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REFERENCE_DIR
from engine.loading import LoadError, build_model, load_model, save_pretrained
from engine.model.config import deepseek_vl_7b

SMALL = REFERENCE_DIR / "models" / "single-siglip"


@pytest.fixture
def small_copy(tmp_path):
    target = tmp_path / "model"
    shutil.copytree(SMALL, target)
    return target


def _logits(model, ids=torch.tensor([[1, 5, 7, 9]])):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_sharded_and_bin_checkpoints_load_identically(tmp_path):
    base = load_model(SMALL).model
    sharded = save_pretrained(base, tmp_path / "sharded", max_shard_bytes=200_000)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    assert (sharded / "model.safetensors.index.json").is_file()
    assert torch.equal(_logits(load_model(sharded).model), _logits(base))

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((SMALL / "config.json").read_text())
    torch.save(load_file(SMALL / "model.safetensors"), bin_dir / "pytorch_model.bin")
    assert torch.equal(_logits(load_model(bin_dir).model), _logits(base))


def test_load_in_bfloat16():
    model = load_model(SMALL, dtype=torch.bfloat16).model
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_real_7b_architecture_builds_without_memory():
    model = build_model(deepseek_vl_7b())
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 7_343_990_017


def test_unknown_model_type(small_copy):
    cfg = json.loads((small_copy / "config.json").read_text())
    cfg["model_type"] = "qwen2_vl"
    (small_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="unsupported model_type 'qwen2_vl'"):
        load_model(small_copy)


def test_directory_without_config(tmp_path):
    with pytest.raises(LoadError, match="has no config.json"):
        load_model(tmp_path)


def test_not_a_directory_nor_hub_id(tmp_path):
    with pytest.raises(LoadError, match="no such directory"):
        load_model(tmp_path / "missing" / "deeper" / "x")


def test_truncated_safetensors(small_copy):
    path = small_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="truncated"):
        load_model(small_copy)


def test_garbage_header(small_copy):
    (small_copy / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(LoadError, match="model.safetensors"):
        load_model(small_copy)


def test_missing_and_unexpected_keys_are_listed(small_copy):
    state = load_file(small_copy / "model.safetensors")
    del state["aligner.layers.0.bias"]
    state["aligner.extra.weight"] = torch.zeros(2)
    save_file(state, small_copy / "model.safetensors")
    with pytest.raises(LoadError) as err:
        load_model(small_copy)
    message = str(err.value)
    assert "Missing keys (1): aligner.layers.0.bias" in message
    assert "Unexpected keys (1): aligner.extra.weight" in message


def test_wrong_shape(small_copy):
    state = load_file(small_copy / "model.safetensors")
    state["aligner.layers.0.bias"] = torch.zeros(3)
    save_file(state, small_copy / "model.safetensors")
    with pytest.raises(LoadError, match=r"wrong shape.*aligner.layers.0.bias"):
        load_model(small_copy)


def test_missing_shard(tmp_path):
    sharded = save_pretrained(load_model(SMALL).model, tmp_path / "s", max_shard_bytes=200_000)
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(LoadError, match="missing shard files"):
        load_model(sharded)


def test_cancelled_load(small_copy):
    import threading

    from engine.loading import LoadCancelled

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(LoadCancelled):
        load_model(small_copy, cancel=cancel)


def test_progress_reports_every_tensor(small_copy):
    seen = []
    load_model(small_copy, progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert seen[-1][1] == seen[-1][2] == len(load_file(small_copy / "model.safetensors"))


def test_fill_random_materializes_a_meta_model():
    from engine.tiny import TINY_CONFIG
    from engine.loading import fill_random
    from engine.model.config import VLConfig

    model = fill_random(build_model(VLConfig.from_official(TINY_CONFIG)), torch.bfloat16)
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.isfinite(_logits(model)).all()
