#!/usr/bin/env python
"""Training cost of each recipe, side by side in one run: ms per optimizer step of run_train.py's Trainer.

    python bench/train_speed.py --variants plain_gpt kl kl_free_soft --steps 60
    python bench/train_speed.py --variants plain_gpt default ebt_hybrid --repeats 3

Variants are bench/ablation.py's, and bench/thinking.py's for the names ablation.py lacks (`default`, the EBT recipes).

Each variant trains `--steps` steps (the CPU preset unless --extra says otherwise) in this process, one after the
other and round-robin over `--repeats`; the first `--skip` steps of each run are not timed (start-up, warm-up).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import run_train  # noqa: E402
from ablation import VARIANTS, flags  # noqa: E402
from thinking import VARIANTS as THINKING  # noqa: E402

EXTRA = {name: value for name, value in THINKING.items() if name not in VARIANTS}


def variant_flags(name):
    return flags(name) if name in VARIANTS else EXTRA[name]


class StepTimer(TrainerCallback):
    def __init__(self, skip):
        self.skip, self.times = skip, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > self.skip:
            self.times.append(time.perf_counter() - self.started)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["plain_gpt", "kl"], choices=sorted({*VARIANTS, *EXTRA}))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output_dir", default="/tmp/nanoebm-train-speed")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timings = {name: [] for name in args.variants}
    for _ in range(args.repeats):
        for name in args.variants:
            timer = StepTimer(args.skip)
            run_train.main(["--preset", "cpu", "--max_steps", str(args.steps), "--do_train", "true",
                            "--do_eval", "false", "--save_strategy", "no", "--logging_steps", str(args.steps),
                            "--disable_tqdm", "true", "--output_dir", f"{args.output_dir}/{name}",
                            "--overwrite_output_dir", "true", *variant_flags(name), *args.extra],
                           callbacks=[timer])
            timings[name].append(1000 * statistics.median(timer.times))
    base = statistics.median(timings[args.variants[0]])
    print(f"\n| variant | ms/step (median) | vs {args.variants[0]} |\n|---|---|---|")
    for name in args.variants:
        ms = statistics.median(timings[name])
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x |")
    print(f"\nreproduce: python bench/train_speed.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
