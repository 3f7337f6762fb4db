"""Training speed on the CPU for the tiny demo model, and what modality grouping does to step time.

1. Throughput: stage 3 (everything but SAM trains) on one-image conversations, and stage 2 on packed text,
   in tokens per second (real tokens, forward + backward + AdamW step), from metrics.jsonl of real runs.
2. Modality grouping (the paper's section 4 claim): the same stage-2 data (language : multimodal = 7 : 3) with
   every global step drawing one modality, versus every sample drawing its own (mixed batches). A mixed batch
   pads its text samples to the image samples' length and cannot pack them, so each step waits for its slowest
   sample. Both runs use one forward per global batch (micro batch = batch), the same seed and steps.

    .venv/bin/python benchmarks/bench_train.py [--steps 12] [--batch-size 8] [--model assets/demo-model]

Not part of the test suite; results go in benchmarks/RESULTS.md by hand (record `uptime`: the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from engine.demo import DEMO_DIR  # noqa: E402
from engine.training.loop import RunConfig, train  # noqa: E402
from training_fixtures import conversations, text_data  # noqa: E402


def steps_of(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "step"]


def run(model: Path, out: Path, data: Path, text: Path, stage: int, steps: int, batch: int, **overrides) -> list[dict]:
    train(RunConfig(model=str(model), out=str(out), data=[str(data)], text_data=[str(text)], stages=[stage],
                    check_memory=False,
                    overrides={"steps": steps, "batch_size": batch, "micro_batch_size": batch, "warmup_steps": 1,
                               **overrides}), log=lambda m: None)
    return steps_of(out)[1:]  # the first step pays one-off costs (allocations, lazy imports)


def summary(records: list[dict]) -> dict:
    seconds = sum(r["seconds"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    return {"steps": len(records), "seconds_per_step": round(seconds / len(records), 3),
            "median_step_s": round(statistics.median(r["seconds"] for r in records), 3),
            "tokens_per_s": round(tokens / seconds, 1), "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEMO_DIR))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = conversations(root / "data", n=24)
        text = text_data(root / "data", n=64)
        results = {
            "stage 3, one-image conversations": summary(run(args.model, root / "s3", data, text, 3, args.steps,
                                                            args.batch_size, language_ratio=0.0)),
            "stage 2, packed text": summary(run(args.model, root / "s2", data, text, 2, args.steps, args.batch_size,
                                                language_ratio=1.0)),
        }
        grouping = {}
        for grouped in (True, False):
            records = run(args.model, root / f"g{grouped}", data, text, 2, args.steps, args.batch_size,
                          language_ratio=0.7, modality_warmup_steps=0, grouped=grouped)
            grouping["grouped" if grouped else "mixed"] = summary(records)
        results["stage 2 at 7:3, one modality per step (grouped)"] = grouping["grouped"]
        results["stage 2 at 7:3, mixed batches"] = grouping["mixed"]
    width = max(map(len, results))
    print(f"{'run':<{width}}  steps  s/step  median s/step  tokens/s")
    for name, r in results.items():
        print(f"{name:<{width}}  {r['steps']:>5}  {r['seconds_per_step']:>6}  {r['median_step_s']:>13}  {r['tokens_per_s']:>8}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
