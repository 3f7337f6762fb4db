"""The stage-2 mixture: language ratio with modality warm-up, one modality per grouped step, and packing that
never lets a sample see another."""

import numpy as np
import pytest
import torch

from engine.loading import load_model
from engine.processing import VLChatProcessor
from engine.training import data
from engine.training.data import IGNORE, LANGUAGE, MULTIMODAL, Encoded
from engine.training.mixture import ModalitySchedule, Sampler, collate, pack
from training_fixtures import tiny_model


def sampler(grouped=True, batch=4, seed=0):
    pools = {LANGUAGE: list(range(0, 50)), MULTIMODAL: list(range(50, 80))}
    return Sampler(pools, ModalitySchedule(target=0.7, warmup_steps=200), batch, seed=seed, grouped=grouped)


def test_warmup_is_linear_from_all_language_to_the_target():
    s = ModalitySchedule(target=0.7, warmup_steps=100)
    assert [s.language_ratio(t) for t in (0, 50, 100, 1000)] == pytest.approx([1.0, 0.85, 0.7, 0.7])


def test_ratio_statistics_over_many_steps_follow_the_schedule():
    s = sampler()
    draws = [s.draw(step)[0] for step in range(4200)]
    assert set(draws[:10]) == {LANGUAGE}  # the first steps are (almost surely) all language
    warm = np.array([d == LANGUAGE for d in draws[:200]])
    after = np.array([d == LANGUAGE for d in draws[200:]])
    # Expected shares: the mean of the linear ramp (0.85) during warm-up, then 0.7; 4 sigma bounds.
    assert abs(warm.mean() - 0.85) < 4 * np.sqrt(0.85 * 0.15 / 200)
    assert abs(after.mean() - 0.7) < 4 * np.sqrt(0.7 * 0.3 / 4000)
    first, second = warm[:100].mean(), warm[100:].mean()
    assert first > second  # the language share is still falling


def test_every_grouped_step_is_single_modality_and_epochs_cover_each_pool():
    s = sampler(batch=5)
    pools = {m: set(v) for m, v in s.pools.items()}
    seen = {LANGUAGE: [], MULTIMODAL: []}
    for step in range(300):
        modality, indices = s.draw(step)
        assert modality in (LANGUAGE, MULTIMODAL) and set(indices) <= pools[modality]
        seen[modality] += indices
    for m in seen:  # each full pass over a pool draws every sample exactly once
        n = len(pools[m])
        for k in range(len(seen[m]) // n):
            assert sorted(seen[m][k * n:(k + 1) * n]) == sorted(pools[m])


def test_mixed_batches_hold_both_modalities_and_resume_draws_the_same():
    mixed = sampler(grouped=False, batch=8)
    assert "mixed" in {mixed.draw(step)[0] for step in range(300, 340)}
    a = sampler()
    first = [a.draw(step) for step in range(40)]
    b = sampler()
    for step in range(25):
        b.draw(step)
    c = sampler()
    c.load_state(b.state())
    assert [c.draw(step) for step in range(25, 40)] == first[25:]


def test_packed_samples_do_not_attend_across_boundaries(tmp_path):
    model = load_model(tiny_model(tmp_path / "model")).model
    processor = VLChatProcessor.from_pretrained(tmp_path / "model", num_image_tokens=16)
    texts = ["The quick brown fox jumps over the lazy dog.", "Numbers: 0123456789.", "A page has a title."]
    samples = [data.encode(data.Sample(f"t:{i}", text=t), processor) for i, t in enumerate(texts)]
    packed = pack(samples, length=64, pad_id=processor.pad_id)
    assert packed.input_ids.shape[0] == 1  # all three share one row
    with torch.no_grad():
        logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                       position_ids=packed.position_ids).logits[0]
        at = 0
        for s in samples:
            alone = model(input_ids=s.input_ids[None]).logits[0]
            torch.testing.assert_close(logits[at:at + len(s)], alone, rtol=1e-5, atol=1e-5)
            at += len(s)
    assert torch.equal(packed.position_ids[0, :at], torch.cat([torch.arange(len(s)) for s in samples]))
    # The packed row's labels are the samples' labels: each sample's first token (BOS) is never a target.
    assert (packed.labels[0, :at] == torch.cat([s.labels for s in samples])).all()
    assert packed.tokens == at == sum(len(s) for s in samples)


def test_packing_respects_the_row_length_and_collate_pads_on_the_right():
    def fake(n, i):
        ids = torch.arange(1, n + 1)
        return Encoded(ids, ids.clone(), torch.zeros(n, dtype=torch.bool), [], LANGUAGE, f"t:{i}")

    rows = pack([fake(5, 0), fake(4, 1), fake(3, 2)], length=8, pad_id=0)
    assert rows.input_ids.shape == (2, 8) and rows.tokens == 12
    assert (rows.attention_mask.sum(-1) > 0).all()  # every position (padding too) sees at least itself
    padded = collate([fake(5, 0), fake(2, 1)], pad_id=0)
    assert padded.input_ids[1].tolist() == [1, 2, 0, 0, 0] and (padded.labels[1, 2:] == IGNORE).all()
