"""The three-stage recipe end to end on tiny models: what each stage trains, loss falling through all stages to a
checkpoint the chat loads, exact resume, and a save interrupted mid-way."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REFERENCE_DIR
from engine.chat import ChatSession
from engine.generation import SamplingParams
from engine.processing import ImageProcessor, ImageProcessorConfig, VLChatProcessor
from engine.runtime import Runtime
from engine.training import loop
from engine.training.data import IGNORE, LANGUAGE, MULTIMODAL, Encoded
from engine.training.loop import RunConfig, latest_checkpoint, train
from engine.training.mixture import collate
from engine.training.stages import TABLE4, scaled
from training_fixtures import REPO_ROOT, conversations, image, text_data, tiny_model

HYBRID = REFERENCE_DIR / "models" / "hybrid-sam-siglip"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = tiny_model(root / "model")
    return root, model, conversations(root / "data"), text_data(root / "data")


def weights(directory):
    return load_file(directory / "model.safetensors")


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def intended(stage: int, names) -> set[str]:
    """Written out independently of engine.training.stages: the paper's Table 4 'trains' row."""
    unused = lambda n: ".attn_pool." in n or "high_layer_norm" in n or "low_layer_norm" in n  # never in the forward
    if stage == 1:
        return {n for n in names if n.startswith("aligner.")}
    if stage == 2:
        return {n for n in names if n.startswith(("aligner.", "language_model."))}
    return {n for n in names if not unused(n) and not n.startswith("vision_model.vision_tower_high.")}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_trains_exactly_its_parameters(setup, stage):
    root, model_dir, convs, text = setup
    out = root / f"only-{stage}"
    train(RunConfig(model=str(model_dir), out=str(out), data=[str(convs)], text_data=[str(text)], stages=[stage],
                    overrides={"steps": 2, "batch_size": 2, "warmup_steps": 0, "language_ratio": 0.0}), log=lambda m: None)
    before, after = weights(model_dir), weights(out / f"stage-{stage}")
    assert changed(before, after) == intended(stage, before)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_hybrid_model_gets_gradients_exactly_where_intended_and_sam_never_changes(tmp_path, stage):
    from conftest import TALKATIVE

    model, _ = loop.prepare_model(HYBRID, stage, RunConfig(model=str(HYBRID), out=str(tmp_path)), torch.device("cpu"))
    tokenizer_owner = VLChatProcessor.from_pretrained(TALKATIVE)  # the reference model ships no tokenizer
    processor = VLChatProcessor(tokenizer_owner.tokenizer, ImageProcessor(ImageProcessorConfig.from_pretrained(HYBRID)),
                                num_image_tokens=576)
    ids = torch.cat([torch.tensor([1]), torch.full((576,), processor.image_id), torch.arange(100, 140)])
    labels = torch.where(ids == processor.image_id, IGNORE, ids)
    labels[0] = IGNORE
    sample = Encoded(ids, labels, ids == processor.image_id, [image(tmp_path, "red", (64, 48))], MULTIMODAL, "t:1")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loop.loss_sum(model, collate([sample], processor.pad_id), processor, torch.device("cpu")).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == intended(stage, before)
    optimizer.step()
    after = dict(model.named_parameters())
    assert {n for n in before if not torch.equal(before[n], after[n])} == with_grad
    assert not any(n.startswith("vision_model.vision_tower_high.") for n in with_grad)  # SAM


def test_the_vision_tower_can_train_at_a_fraction_of_the_lr_in_stage_3(setup, tmp_path):
    root, model_dir, convs, text = setup
    before = weights(model_dir)

    def largest_step(ratio):  # one AdamW step from zero moments moves each weight by about its group's lr
        out = tmp_path / f"ratio-{ratio}"
        train(RunConfig(model=str(model_dir), out=str(out), data=[str(convs)], stages=[3], overrides={
            "steps": 1, "batch_size": 2, "warmup_steps": 0, "lr": 1e-2, "vision_lr_ratio": ratio}), log=lambda m: None)
        after = weights(out / "stage-3")
        step = {part: max((after[k].float() - before[k].float()).abs().max().item() for k in before if k.startswith(part))
                for part in ("vision_model.", "language_model.")}
        return step["vision_model."], step["language_model."]

    assert largest_step(1.0) == pytest.approx((1e-2, 1e-2), rel=0.1)
    assert largest_step(0.25) == pytest.approx((2.5e-3, 1e-2), rel=0.1)
    assert largest_step(0.0)[0] == 0.0  # a frozen tower, the LLM still trains
    with pytest.raises(loop.TrainingError, match="vision_lr_ratio must be 0 or more"):
        largest_step(-0.5)


def test_presets_follow_table_4_scaled_to_the_data_and_flags_win():
    assert (TABLE4[1].lr, TABLE4[2].lr, TABLE4[3].lr) == (1e-3, 3e-5, 2e-5)
    assert [TABLE4[s].schedule for s in (1, 2, 3)] == ["cosine", "step", "cosine"]
    assert all(TABLE4[s].betas == (0.9, 0.95) and TABLE4[s].weight_decay == 0 and TABLE4[s].clip == 1.0 for s in (1, 2, 3))
    small = scaled(2, 1000)
    assert small.batch_size == 64 and small.steps == 16 and small.modality_warmup_steps == 4 and small.pack
    assert scaled(1, 10**7).batch_size == 256  # never above the paper's
    assert scaled(3, 1000, {"lr": 1e-4, "steps": 7}).lr == 1e-4 and scaled(3, 1000, {"steps": 7}).steps == 7
    with pytest.raises(ValueError, match="unknown stage setting"):
        scaled(3, 10, {"learning_rate": 1})
    assert [loop.lr_factor(s, scaled(2, 1000, {"steps": 100, "warmup_steps": 10})) for s in (0, 9, 50, 85, 95)] == \
        pytest.approx([0.1, 1.0, 1.0, 0.316, 0.1])


def test_loss_falls_through_three_stages_and_the_final_checkpoint_chats(setup):
    root, model_dir, convs, text = setup
    out = root / "full"
    result = train(RunConfig(model=str(model_dir), out=str(out), data=[str(convs)], text_data=[str(text)],
                             overrides={"steps": 8, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1},
                             stage_overrides={1: {"lr": 1e-2}}), log=lambda m: None)
    assert result.final == out / "final" and result.stages_done == [1, 2, 3]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    for stage in (1, 2, 3):
        losses = [r["loss"] for r in steps if r["stage"] == stage]
        assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3]), (stage, losses)
        assert {"step", "stage", "loss", "lr", "modality", "tokens_per_s"} <= steps[0].keys()
    assert {r["modality"] for r in steps if r["stage"] == 1} == {MULTIMODAL}
    assert {r["modality"] for r in steps if r["stage"] == 2} == {LANGUAGE, MULTIMODAL}
    assert any(r.get("event") == "seq_len" and r["previous"] == 512 for r in records) is False  # 16-token images fit
    for d in ("stage-1", "stage-2", "stage-3", "final"):
        assert (out / d / "config.json").is_file() and (out / d / "tokenizer.json").is_file()
    runtime = Runtime.load(out / "final", device="cpu")
    session = ChatSession(runtime)
    session.add_user("What colour is it?", [str(image(root / "data", "red"))])
    answer = session.answer(SamplingParams(max_new_tokens=8))
    assert isinstance(answer, str) and session.last_stats.tokens > 0


def test_sequence_length_grows_to_fit_images_and_says_so(tmp_path, setup):
    _, model_dir, convs, _ = setup
    out = tmp_path / "run"
    train(RunConfig(model=str(model_dir), out=str(out), data=[str(convs)], stages=[1],
                    overrides={"steps": 1, "batch_size": 1, "seq_len": 20}), log=lambda m: None)
    grown = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"seq_len"' in x and '"event"' in x]
    assert grown and grown[0]["previous"] == 20 and grown[0]["seq_len"] > 20 and "image tokens" in grown[0]["message"]


def resumable(setup, out, **kw):
    root, model_dir, convs, text = setup
    return RunConfig(model=str(model_dir), out=str(out), data=[str(convs)], stages=[3], save_every=2,
                     overrides={"steps": 6, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1}, **kw)


@pytest.fixture(scope="module")
def uninterrupted(setup):
    out = setup[0] / "uninterrupted"
    train(resumable(setup, out), log=lambda m: None)
    return weights(out / "stage-3")


def test_resume_after_a_stop_equals_an_uninterrupted_run(setup, uninterrupted):
    out = setup[0] / "stopped"
    stop = threading.Event()
    first = train(resumable(setup, out), log=lambda m: None, stop=stop,
                  on_step=lambda r: stop.set() if r["step"] == 3 else None)
    assert first.stopped and latest_checkpoint(out, 3).name == "stage-3-step-0000003"
    second = train(resumable(setup, out, resume=True), log=lambda m: None)
    assert second.final is not None
    after = weights(out / "stage-3")
    assert all(torch.equal(after[k], uninterrupted[k]) for k in after)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"type": "step"' in x]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resuming_a_checkpoint_saved_with_one_parameter_group_says_so(setup):
    out = setup[0] / "one-group"
    stop = threading.Event()
    train(resumable(setup, out), log=lambda m: None, stop=stop, on_step=lambda r: stop.set() if r["step"] == 3 else None)
    saved = latest_checkpoint(out, 3) / "optimizer.pt"
    state = torch.load(saved, weights_only=False)  # as saved before the vision tower had a group of its own
    state["param_groups"] = [{**state["param_groups"][0],
                              "params": [i for g in state["param_groups"] for i in g["params"]]}]
    torch.save(state, saved)
    with pytest.raises(loop.TrainingError, match="does not fit this run's parameter groups"):
        train(resumable(setup, out, resume=True), log=lambda m: None)
    assert saved.exists()  # nothing deleted: the run can start again without --resume


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_usable(setup, uninterrupted, monkeypatch):
    out = setup[0] / "killed"
    real_save = loop.torch.save
    saves = []

    def dying_save(obj, path, *a, **k):  # the second checkpoint dies after its weights, before the rest
        saves.append(path)
        if len(saves) == 3:
            raise KeyboardInterrupt("killed mid-save")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(loop.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(resumable(setup, out), log=lambda m: None)
    monkeypatch.setattr(loop.torch, "save", real_save)
    folder = out / "checkpoints"
    assert any(p.name.startswith(".tmp-stage-3-step-0000004") for p in folder.iterdir())  # the half-written one
    assert latest_checkpoint(out, 3).name == "stage-3-step-0000002"
    train(resumable(setup, out, resume=True), log=lambda m: None)
    after = weights(out / "stage-3")
    assert all(torch.equal(after[k], uninterrupted[k]) for k in after)


def test_cli_train_stops_on_sigterm_with_a_checkpoint_and_resumes(setup, tmp_path):
    _, model_dir, convs, _ = setup
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "engine", "train", "--model", str(model_dir), "--data", str(convs), "--stages", "3",
           "--out", str(out), "--steps", "12", "--batch-size", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"type": "step"' in metrics.read_text()):
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)  # what the app's supervisor sends to stop a run
    _, err = process.communicate(timeout=120)
    assert process.returncode == 3, err
    assert latest_checkpoint(out, 3) is not None and "stopping after this step" in err
    with pytest.raises(loop.TrainingError, match="pass --resume"):  # the CLI prints this and exits 2
        train(RunConfig(model=str(model_dir), out=str(out), data=[str(convs)], stages=[3]), log=lambda m: None)
    done = subprocess.run(cmd + ["--resume"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == str(out / "final"), done.stderr
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"type": "step"' in x]
    assert steps == list(range(1, 13))


def test_config_file_then_flags_make_the_run_config(tmp_path):
    import argparse

    from engine.__main__ import add_train_arguments, run_config

    (tmp_path / "run.yaml").write_text("model: m\nout: o\ndata: a.jsonl\nstages: 2,3\nlr: 1.0e-4\nlora: true\n"
                                       "stage_2: {steps: 50, language_ratio: 0.6}\n")
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    config = run_config(parser.parse_args(["--config", str(tmp_path / "run.yaml"), "--lr", "2e-4", "--seed", "7",
                                           "--text-data", "t.txt", "--no-grouping"]))
    assert (config.model, config.out, config.data, config.text_data, config.stages) == ("m", "o", ["a.jsonl"], ["t.txt"], [2, 3])
    assert config.overrides == {"lr": 2e-4, "grouped": False} and config.stage_overrides == {2: {"steps": 50, "language_ratio": 0.6}}
    assert config.lora and config.seed == 7 and not config.qlora
    (tmp_path / "bad.yaml").write_text("model: m\nout: o\ndata: a\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown setting.*learning_rate"):
        run_config(parser.parse_args(["--config", str(tmp_path / "bad.yaml")]))


def test_plan_shows_each_stage_before_any_weights_load(setup):
    _, model_dir, convs, text = setup
    result = loop.plan(RunConfig(model=str(model_dir), out="unused", data=[str(convs)], text_data=[str(text)],
                                 overrides={"seq_len": 10}, stage_overrides={2: {"lr": 1e-4}}))
    assert result["data"]["samples"] == {MULTIMODAL: 8, LANGUAGE: 10}
    stages = {s["stage"]: s for s in result["stages"]}
    assert [stages[s]["config"]["lr"] for s in (1, 2, 3)] == [1e-3, 1e-4, 2e-5]
    assert stages[1]["samples"] == 8 and stages[1]["language_share"] == 0.0 and stages[2]["language_share"] == 0.7
    assert stages[3]["samples"] == 10 and stages[3]["language_share"] == pytest.approx(0.2)  # its own data's share
    assert all(s["grown_from"] == 10 and s["config"]["seq_len"] > 10 for s in stages.values())
    assert all(s["memory"]["fits"] and s["memory"]["total_bytes"] > 0 for s in stages.values())


def test_cli_dry_run_prints_the_plan_as_json(setup, capsys):
    from engine.__main__ import main

    _, model_dir, convs, _ = setup
    assert main(["train", "--model", str(model_dir), "--data", str(convs), "--out", "unused", "--stages", "3",
                 "--lora", "--dry-run"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in result["stages"]] == [3] and result["stages"][0]["config"]["answers_only"]
