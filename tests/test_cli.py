"""`python -m engine` as a user runs it: a real subprocess on the demo model."""

import json
import subprocess
import sys

from PIL import Image

from conftest import REPO


def run(args, stdin=""):
    return subprocess.run([sys.executable, "-m", "engine", *args], input=stdin, capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_chat_session_with_images_reset_and_exit(tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 48), "red").save(image)
    script = f"hello\n/image {image}\nwhat is this?\n/image {tmp_path}/missing.png\n/reset\n/exit\n"
    result = run(["chat", "--max-new-tokens", "6"], script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Assistant:") == 2
    assert "[1 image(s)]" in result.stdout
    assert "no such file" in result.stdout
    assert "(new conversation)" in result.stdout
    assert "prompt tokens from cache" in result.stderr


def test_8bit_chat_on_cpu_uses_the_int8_kernels_and_says_so():
    result = run(["chat", "--load-8bit", "--device", "cpu", "--max-new-tokens", "4"], "hello\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "(bfloat16, quantization 8bit (int8)" in result.stderr
    kernel = result.stderr.split("MiB; ", 1)[1].splitlines()[0]
    assert kernel.startswith(("native AVX2 int8", "PyTorch int8 (")), kernel  # and why, when not native
    assert result.stdout.count("Assistant:") == 1


def test_bad_image_is_reported_and_the_chat_goes_on(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    result = run(["chat", "--max-new-tokens", "4", "--image", str(fake)], "look\nhi\n/exit\n")
    assert result.returncode == 0
    assert "error:" in result.stdout and "fake.png" in result.stdout
    assert result.stdout.count("Assistant:") == 2
    assert "image(s)]" not in result.stdout


def test_inspect_the_7b_without_weights():
    result = run(["inspect", "--model", "7b"])
    report = json.loads(result.stdout)
    assert report["parameters"] == 7_343_990_017
    assert report["image_tokens"] == 576 and report["input_size"] == 1024


def test_inspect_says_which_kernels_would_run_with_and_without_native_ones():
    import os

    on = json.loads(run(["inspect", "--model", "1.3b"]).stdout)
    off = json.loads(subprocess.run([sys.executable, "-m", "engine", "inspect", "--model", "1.3b"], capture_output=True,
                                    text=True, cwd=REPO, timeout=300, env={**os.environ, "DSVL_NATIVE": "0"}).stdout)
    assert set(on["backends"]) == {"fp32", "bf16", "8bit", "4bit"} and on["device"] == "cpu"
    if on["native_kernels"] == "loaded":
        assert on["backends"]["4bit"]["summary"] == "native AVX2 NF4"
        assert on["backends"]["8bit"]["int8 matmul (decode)"] == "native AVX2 int8"
    assert off["native_kernels"] == "disabled by DSVL_NATIVE=0"
    assert off["backends"]["4bit"]["summary"] == "PyTorch int4, groups of 64 (DSVL_NATIVE=0)"
    assert off["backends"]["bf16"]["attention (decode)"] == "PyTorch matmul + softmax (DSVL_NATIVE=0)"


def test_missing_model_is_a_clear_error(tmp_path):
    result = run(["chat", "--model", str(tmp_path / "nowhere" / "x" / "y")], "")
    assert result.returncode == 2
    assert "error:" in result.stderr and "no such directory" in result.stderr
