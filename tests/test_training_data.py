"""Training data: the formats, every bad-data case with its file and line, the SFT answer mask token by token,
and chats exported as a data set."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import TALKATIVE
from engine.processing import EOS_TOKEN, IMAGE_TOKEN, VLChatProcessor
from engine.training import data
from engine.training.data import IGNORE, LANGUAGE, MULTIMODAL
from training_fixtures import REPO_ROOT, conversations, image


@pytest.fixture(scope="module")
def processor():
    return VLChatProcessor.from_pretrained(TALKATIVE, num_image_tokens=16)


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_all_formats_read_into_the_same_conversation(tmp_path, processor):
    image(tmp_path, "red")
    deepseek = write(tmp_path / "ds.jsonl", [{"conversations": [
        {"role": "User", "content": f"{IMAGE_TOKEN}What colour?", "images": ["img/red.png"]},
        {"role": "Assistant", "content": "Red."}]}])
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"id": "1", "image": "img/red.png", "conversations": [
        {"from": "human", "value": "<image>What colour?"}, {"from": "gpt", "value": "Red."}]}], indent=2))
    messages = write(tmp_path / "msgs.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "img/red.png"}},
                                     {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "Red."}]}])
    text = tmp_path / "notes.txt"
    text.write_text("First paragraph\nstill first.\n\nSecond one.\n")
    report = data.check([deepseek, llava, messages], [text], processor)
    assert report.ok, report.format()
    convs = [s for s in report.samples if s.text is None]
    assert len(convs) == 3 and report.counts() == {MULTIMODAL: 3, LANGUAGE: 2}
    assert all(s.messages == convs[0].messages and s.images == convs[0].images for s in convs)
    assert [s.text for s in report.samples if s.text] == ["First paragraph\nstill first.", "Second one."]
    assert report.samples[-1].source.endswith("notes.txt:4")


BAD_LINES = [
    ('{"conversations": [', "malformed JSON"),
    ({"conversations": [{"role": "User", "content": f"{IMAGE_TOKEN}hi", "images": ["img/nope.png"]},
                        {"role": "Assistant", "content": "x"}]}, "missing image 'img/nope.png'"),
    ({"conversations": [{"role": "User", "content": f"{IMAGE_TOKEN}hi", "images": ["../outside.png"]},
                        {"role": "Assistant", "content": "x"}]}, "leaves the dataset directory"),
    ({"conversations": [{"role": "User", "content": f"{IMAGE_TOKEN}{IMAGE_TOKEN}hi", "images": ["img/red.png"]},
                        {"role": "Assistant", "content": "x"}]}, "2 image placeholders but 1 image(s)"),
    ({"conversations": [{"role": "User", "content": "long " * 300}, {"role": "Assistant", "content": "x"}]},
     "longer than the sequence length 200"),
    ({"conversations": [{"role": "Robot", "content": "hi"}]}, "unknown role 'Robot'"),
    ({"conversations": [{"role": "User", "content": "hi"}]}, "no Assistant answer"),
]


def test_every_bad_case_is_reported_with_file_and_line(tmp_path, processor):
    image(tmp_path, "red")
    (tmp_path.parent / "outside.png").write_bytes((tmp_path / "img" / "red.png").read_bytes())
    good = {"conversations": [{"role": "User", "content": "hi"}, {"role": "Assistant", "content": "hello"}]}
    path = write(tmp_path / "bad.jsonl", [good] + [line for line, _ in BAD_LINES])
    report = data.check([path], [], processor, max_length=200)
    assert not report.ok and len(report.samples) == 1
    assert [p.line for p in report.problems] == list(range(2, 2 + len(BAD_LINES)))
    for problem, (_, expected) in zip(report.problems, BAD_LINES):
        assert expected in problem.message and str(problem).startswith(f"{path}:{problem.line}: ")
    with pytest.raises(data.DataError) as refused:
        data.load([path], [], processor, max_length=200)
    assert f"{path}:3: missing image" in str(refused.value) and "--skip-bad" in str(refused.value)
    assert len(data.load([path], [], processor, max_length=200, skip_bad=True).samples) == 1


def test_data_check_cli_prints_the_report_and_fails_on_problems(tmp_path):
    good = conversations(tmp_path, n=2)
    bad = write(tmp_path / "bad.jsonl", ["not json"])
    run = [sys.executable, "-m", "engine", "data", "check"]
    ok = subprocess.run(run + [str(good)], capture_output=True, text=True, cwd=REPO_ROOT)
    assert ok.returncode == 0 and "2 multimodal, 2 language" in ok.stdout and "no problems" in ok.stdout
    fail = subprocess.run(run + [str(good), str(bad)], capture_output=True, text=True, cwd=REPO_ROOT)
    assert fail.returncode == 1 and f"{bad}:1: malformed JSON" in fail.stdout


def test_answer_only_mask_on_a_multi_turn_multi_image_conversation(tmp_path, processor):
    red, blue = image(tmp_path, "red"), image(tmp_path, "blue")
    turns = [("User", f"{IMAGE_TOKEN}{IMAGE_TOKEN}Compare the two pictures."), ("Assistant", "The first is red."),
             ("User", "And the second?"), ("Assistant", "It is blue, 100%.")]
    sample = data.Sample("t:1", [{"role": r, "content": c} for r, c in turns], [red, blue], system="Be brief.")
    ids, labels = data.encode_tokens(sample, processor, answers_only=True)
    # The token ids are exactly the inference prompt's (placeholders expanded to 16 image tokens each).
    assert torch.equal(ids, processor.encode(sample.messages, "Be brief.")[1])
    n_image = int((ids == processor.image_id).sum())
    assert n_image == 2 * 16 and (labels[ids == processor.image_id] == IGNORE).all()
    # Walk the tokens: supervised runs are exactly the answers with their EOS, nothing else.
    runs, current = [], []
    for token, label in zip(ids.tolist(), labels.tolist()):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    decoded = [processor.tokenizer.decode(run) for run in runs]
    assert decoded == [" The first is red." + EOS_TOKEN, " It is blue, 100%." + EOS_TOKEN]
    unsupervised = processor.tokenizer.decode([t for t, l in zip(ids.tolist(), labels.tolist()) if l == IGNORE and t != processor.image_id])
    assert unsupervised.count("Be brief.") == 1 and "Compare the two pictures." in unsupervised and "And the second?" in unsupervised
    assert "red" not in unsupervised.replace("Compare", "")  # answers never leak into the masked part
    # Without answers_only (stages 1-2) every text token is supervised, images and BOS still are not.
    _, all_text = data.encode_tokens(sample, processor, answers_only=False)
    assert int((all_text != IGNORE).sum()) == len(ids) - n_image - 1


def test_text_samples_supervise_every_token_and_end_with_eos(processor):
    ids, labels = data.encode_tokens(data.Sample("t:1", text="Hello world."), processor)
    assert ids[-1] == processor.tokenizer.eos_token_id and labels[0] == IGNORE and (labels[1:] == ids[1:]).all()


def test_own_chats_export_to_a_dataset_that_checks_clean(tmp_path, processor):
    red = image(tmp_path / "app", "red")
    chats = [
        [{"role": "user", "text": "What is this?", "images": [str(red)]}, {"role": "assistant", "text": "A red card."},
         {"role": "user", "text": "unanswered"}],
        {"system": "Be brief.", "messages": [{"role": "user", "text": "Hi"}, {"role": "assistant", "text": "Hello."}]},
        [{"role": "user", "text": "never answered"}],
    ]
    path = data.export_conversations(chats, tmp_path / "export")
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 2  # the chat with no answer teaches nothing
    first = lines[0]["conversations"]
    assert first[0]["content"] == f"{IMAGE_TOKEN}What is this?" and first[0]["images"][0].startswith("images/")
    assert len(first) == 2  # the trailing unanswered question is dropped
    report = data.check([path], [], processor)
    assert report.ok and report.samples[1].system == "Be brief." and report.counts() == {MULTIMODAL: 1, LANGUAGE: 1}
    assert (tmp_path / "export" / first[0]["images"][0]).read_bytes() == red.read_bytes()
