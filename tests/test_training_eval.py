"""Evaluation (multi-choice PPL, text perplexity), the memory estimate's refusal, and the GPU-oriented switches
(gradient checkpointing, bf16 autocast) on the CPU."""

import json
import math
import subprocess
import sys

import pytest
import torch

from engine.loading import load_model
from engine.model.config import deepseek_vl_7b
from engine.processing import IMAGE_TOKEN, VLChatProcessor
from engine.training import data, evaluate, loop
from engine.training.loop import RunConfig, TrainingError
from engine.training.memory import estimate
from engine.training.mixture import collate
from engine.training.stages import scaled
from training_fixtures import REPO_ROOT, conversations, image, text_data, tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model_dir = tiny_model(root / "model")
    image(root / "data", "red"), image(root / "data", "blue")
    mc = root / "data" / "mc.jsonl"
    mc.write_text("".join(json.dumps(x) + "\n" for x in [
        {"images": ["img/red.png"], "question": "What colour is it?", "options": ["Red.", "Blue.", "It is green."], "answer": 0},
        {"images": ["img/blue.png"], "question": "Colour?", "options": ["It is red.", "Blue."], "answer": 1},
        {"images": [], "question": "Two plus two?", "options": ["Four.", "Five."], "answer": 0}]))
    return root, model_dir, mc, text_data(root / "data", n=3)


def test_option_perplexity_matches_the_models_own_loss(setup):
    root, model_dir, mc, _ = setup
    model = load_model(model_dir).model
    processor = VLChatProcessor.from_pretrained(model_dir, num_image_tokens=16)
    item = evaluate.read_mc(mc)[0]
    ours = evaluate.option_perplexities(model, processor, item)
    for (sample, _, _), ppl in zip(item, ours):
        # Independently: the prompt up to "Assistant:" is a prefix of prompt + option; the model's mean-reduced
        # loss over the option tokens (without the final EOS) is log(perplexity).
        question, option = sample.messages[0]["content"], sample.messages[1]["content"]
        prefix = processor.process([{"role": "User", "content": question}, {"role": "Assistant", "content": ""}],
                                   [str(p) for p in sample.images])
        full = processor([{"role": "User", "content": question}, {"role": "Assistant", "content": option}],
                         [str(p) for p in sample.images])
        labels = full.input_ids.clone()
        labels[:, :len(prefix.input_ids)] = -100
        labels[:, -1] = -100  # EOS
        with torch.no_grad():
            loss = model(input_ids=full.input_ids, pixel_values=full.pixel_values, images_seq_mask=full.images_seq_mask,
                         images_emb_mask=full.images_emb_mask, labels=labels).loss
        assert ppl == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_eval_cli_prints_one_json_object(setup):
    _, model_dir, mc, text = setup
    done = subprocess.run([sys.executable, "-m", "engine", "eval", "--model", str(model_dir), "--device", "cpu",
                           "--mc", str(mc), "--text", str(text)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["mc_items"] == 3 and result["mc_accuracy"] in (0, 1 / 3, 2 / 3, 1)
    assert result["text_samples"] == 3 and result["text_ppl"] > 1


def test_a_bad_multi_choice_line_is_refused_with_its_line(setup, tmp_path):
    bad = tmp_path / "mc.jsonl"
    bad.write_text(json.dumps({"question": "q", "options": ["a", "b"], "answer": 0}) + "\n"
                   + json.dumps({"question": "q", "options": ["a"], "answer": 3}) + "\n")
    with pytest.raises(data.DataError, match=rf"{bad}:2: \"options\" must be a list of at least two"):
        evaluate.read_mc(bad)


def test_memory_estimate_refuses_the_7b_full_finetune_on_a_small_gpu_and_advises():
    cfg = scaled(3, 10_000, {"micro_batch_size": 4, "seq_len": 4096})
    full = estimate(deepseek_vl_7b(), 3, cfg, device="cuda", available=24 * 2**30)
    assert not full.fits and full.parts["weights"] > 25 * 2**30 and full.parts["optimizer"] == 2 * full.parts["gradients"]
    assert "--lora" in full.refusal() and "--gradient-checkpointing" in full.refusal() and "--qlora" in full.refusal()
    cfg1 = scaled(3, 10_000, {"micro_batch_size": 1, "seq_len": 1024})
    small = estimate(deepseek_vl_7b(), 3, cfg1, qlora=True, gradient_checkpointing=True, bf16=True, device="cuda",
                     available=24 * 2**30)
    assert small.fits and small.total < full.total / 5
    stage1 = estimate(deepseek_vl_7b(), 1, cfg1, device="cuda", available=None)
    assert stage1.parts["gradients"] < 2**30 and stage1.fits  # the adaptor alone trains


def test_training_refuses_before_loading_when_memory_is_short(setup, monkeypatch):
    root, model_dir, _, _ = setup
    monkeypatch.setattr("engine.runtime.available_bytes", lambda device: 1 << 20)
    with pytest.raises(TrainingError, match="will not fit.*Try: --gradient-checkpointing"):
        loop.train(RunConfig(model=str(model_dir), out=str(root / "refused"), data=[str(conversations(root / "c"))],
                             stages=[3], overrides={"steps": 1}), log=lambda m: None)


def test_gradient_checkpointing_gives_the_same_gradients_and_bf16_autocast_runs_on_cpu(setup):
    root, model_dir, _, _ = setup
    processor = VLChatProcessor.from_pretrained(model_dir, num_image_tokens=16)
    sample = data.Sample("t:1", [{"role": "User", "content": f"{IMAGE_TOKEN}Colour?"},
                                 {"role": "Assistant", "content": "Red."}], [image(root / "data", "red")])
    rows = collate([data.encode(sample, processor)], processor.pad_id)
    grads = []
    for checkpointing in (False, True):
        run = RunConfig(model=str(model_dir), out=str(root), gradient_checkpointing=checkpointing)
        model, _ = loop.prepare_model(model_dir, 3, run, torch.device("cpu"))
        wrapped = [m for m in model.modules() if "forward" in vars(m)]  # blocks whose forward recomputes
        assert len(wrapped) == (2 + 2 if checkpointing else 0)  # 2 decoder layers + 2 ViT blocks
        loop.loss_sum(model, rows, processor, torch.device("cpu")).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
    loss = loop.loss_sum(model, rows, processor, torch.device("cpu"), bf16=True)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_eval_lines_during_training_and_8bit_adamw_state_in_checkpoints(setup):
    root, model_dir, mc, text = setup
    out = root / "eval-run"
    loop.train(RunConfig(model=str(model_dir), out=str(out), data=[str(conversations(root / "c2"))], stages=[3],
                         eval_mc=str(mc), eval_text=str(text), eval_every=1, save_every=1, optimizer="adamw8bit",
                         overrides={"steps": 2, "batch_size": 2}), log=lambda m: None)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2] and all(r["mc_items"] == 3 and r["text_ppl"] > 1 for r in evals)
    state = torch.load(loop.latest_checkpoint(out, 3) / "optimizer.pt", weights_only=False)["state"]
    packed = [s["__bnb_optimizer_quant_state__"] for s in state.values() if "__bnb_optimizer_quant_state__" in s]
    assert any(v.dtype == torch.uint8 for q in packed for v in q.values() if torch.is_tensor(v))  # 8-bit moments
