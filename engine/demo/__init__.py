"""The embedded demo model: a small DeepSeek-VL trained by the project's own three-stage recipe on the generated
shapes world (`world.py`), so a fresh clone answers real questions about real images with no download.

`python -m engine make-demo` rebuilds it from nothing (`build.py`); `assets/demo-model/` holds the committed copy,
its model card, and the log and metrics of the build that made it.
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo-model"
EXAMPLES_DIR = DEMO_DIR.parent / "examples"  # the chat's clickable examples, which the demo answers right
DEMO_NAME = "demo (small DeepSeek-VL trained on shapes, colours, counts and words)"
DEMO_ABOUT = ("This is a small demo model, trained by this project's recipe on simple pictures of shapes, colours, "
              "counts and written words: it names colours and shapes, describes such a picture and compares two "
              "of them well, and counts right about four times in five, but it does not read the written word (its "
              "model card in assets/demo-model has the figures).")
DEMO_NEXT = ("For real use load deepseek-ai/deepseek-vl-7b-chat (add --load-4bit on a small GPU) or a checkpoint "
             "made in the Training tab, from the Model tab or `run_app.py --model …`.")
