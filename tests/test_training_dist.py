"""Data parallel and FSDP: 2-process torchrun (gloo, CPU) runs make the same updates as 1 process on the same global
batch, and a sharded run resumes from its checkpoint."""

import subprocess
import sys

import torch
from safetensors.torch import load_file

from engine.training.loop import RunConfig, train
from training_fixtures import REPO_ROOT, conversations, text_data, tiny_model

SETTINGS = {"steps": 3, "batch_size": 4, "micro_batch_size": 1, "lr": 1e-3, "warmup_steps": 1, "language_ratio": 0.5}


def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    model = tiny_model(tmp_path / "model")
    convs, text = conversations(tmp_path / "data"), text_data(tmp_path / "data")
    # Stage 2: both modalities, packed language steps, uneven token counts between the two processes' halves.
    train(RunConfig(model=str(model), out=str(tmp_path / "one"), data=[str(convs)], text_data=[str(text)],
                    stages=[2], overrides=SETTINGS), log=lambda m: None)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "engine",
           "train", "--model", str(model), "--data", str(convs), "--text-data", str(text), "--stages", "2",
           "--out", str(tmp_path / "two"), "--device", "cpu", *flags]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = load_file(tmp_path / "one" / "stage-2" / "model.safetensors")
    two = load_file(tmp_path / "two" / "stage-2" / "model.safetensors")
    start = load_file(model / "model.safetensors")
    moved = [k for k in one if not torch.equal(one[k], start[k])]
    assert moved  # the comparison below is between trained weights, not two copies of the start
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=2e-6)
    metrics = [line for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if '"type": "step"' in line]
    assert len(metrics) == 3 and '"world": 2' in (tmp_path / "two" / "metrics.jsonl").read_text()


def test_fsdp_two_processes_equal_one_process_and_resume_from_a_sharded_checkpoint(tmp_path):
    import shutil

    model = tiny_model(tmp_path / "model")
    convs = conversations(tmp_path / "data")
    settings = {k: v for k, v in SETTINGS.items() if k != "language_ratio"} | {"steps": 4}
    train(RunConfig(model=str(model), out=str(tmp_path / "one"), data=[str(convs)], stages=[3], overrides=settings),
          log=lambda m: None)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "engine",
           "train", "--model", str(model), "--data", str(convs), "--stages", "3", "--out", str(tmp_path / "two"),
           "--device", "cpu", "--fsdp", "--save-every", "2", *flags]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = load_file(tmp_path / "one" / "stage-3" / "model.safetensors")
    two = load_file(tmp_path / "two" / "stage-3" / "model.safetensors")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=2e-6)
    # As if killed after the step-2 checkpoint: the stage output is gone, --resume continues from the shards' state.
    for d in ("stage-3", "final"):
        shutil.rmtree(tmp_path / "two" / d)
    done = subprocess.run(cmd + ["--resume"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step 2" in done.stderr
    resumed = load_file(tmp_path / "two" / "stage-3" / "model.safetensors")
    for k in one:
        torch.testing.assert_close(resumed[k], one[k], rtol=0, atol=2e-6)
