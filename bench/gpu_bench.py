#!/usr/bin/env python
"""nanoebm against nanoGPT's Shakespeare-char GPU config: validation bits per character and training cost, on a GPU.

What it measures. Each recipe trains through run_train.main, in this process, one after the other, with nanoGPT's
config/train_shakespeare_char.py: 6 layers, 6 heads, 384 wide, block 256, batch 64, 5000 steps, dropout 0.2, no
biases (nanoGPT's default), AdamW lr 1e-3 with 100 warm-up steps and cosine decay to 1e-4 (cosine_with_min_lr,
min_lr_rate 0.1), beta2 0.99, weight decay 0.1, gradient clipping 1.0; bf16 autocast and torch.compile unless
--no_bf16 / --no_compile. Recipes:
    plain_gpt   --use_thinking false --use_contrastive false: System 1 only, the nanoGPT path
    nanoebm     no extra flags: nanoebm's default recipe (thinking + contrastive divergence)
Per recipe it reports
  - validation bits per character of System 1 and System 2 (System 2 only where the recipe thinks), and System 1's
    loss in nats, of the final model on the whole validation split (the last 10% of the text): --eval_blocks
    defaults to the number of evenly spaced blocks whose targets cover every validation character;
  - ms per optimizer step: median over the steps after the first --skip (those include torch.compile's
    compilation), timed from on_step_begin to on_step_end with a torch.cuda.synchronize at both ends;
  - training tokens/s = batch * block * processes / (median step time);
  - peak GPU memory: torch.cuda.max_memory_allocated, reset before each recipe (training and the final evaluation);
  - the ratio of nanoebm's ms/step to plain_gpt's.
Reference (quoted from nanoGPT's README, not run here): best validation loss 1.4697 nats/char on one A100, i.e.
1.4697 / ln 2 = 2.1203 bits/char. nanoGPT's figure is the best of evaluations every 250 steps on 200 random
batches; this script evaluates the final model once, on the whole split.

Commands (from the repository root):
    python bench/gpu_bench.py                              # both recipes, 5000 steps each, bf16 + compile
    python bench/gpu_bench.py --recipes plain_gpt --output bench/results/gpu_bench_plain.json
    python bench/gpu_bench.py --no_compile --steps 1000    # a shorter run without torch.compile
    python bench/gpu_bench.py --smoke                      # a 10-step CPU check of the script (any machine)
The markdown table, device name, torch/transformers versions, date and the command that reproduces the run are
printed; the same goes to --output as JSON (rewritten after every recipe, so a run cut short keeps what finished).

No GPU figure is ever faked: without CUDA the script refuses to run (exit status 2) unless --smoke is given, and a
row is only printed (and written) for a recipe that actually ran to the end; a recipe that failed is reported as
such, with no numbers. --smoke trains a tiny model (1 layer, 32 wide, block 32, 10 steps, 4 validation blocks) on
the CPU without bf16 or compile: it checks the plumbing, and its numbers, labelled smoke, mean nothing.
"""

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROG = "gpu_bench.py"
NO_CUDA = "no CUDA device: this benchmark needs a GPU; --smoke runs a 10-step CPU check of the script itself"
NANOGPT_VAL_LOSS = 1.4697  # nats/char, nanoGPT README (shakespeare_char, one A100, about 3 minutes)
RECIPES = {
    "plain_gpt": ["--use_thinking", "false", "--use_contrastive", "false"],
    "nanoebm": [],  # the defaults: thinking + contrastive divergence
}
RECIPE_TEXT = {"plain_gpt": "plain GPT (System 1 only)", "nanoebm": "nanoebm default (thinking + CD)"}
TRAIN_FRACTION = 0.9  # run_train's default split: the last 10% validates

# nanoGPT's config/train_shakespeare_char.py, every field passed to run_train.py explicitly (over the gpu preset)
NANOGPT_CONFIG = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, per_device_train_batch_size=64, dropout=0.2,
                      bias=False, learning_rate=1e-3, warmup_steps=100, lr_scheduler_type="cosine_with_min_lr",
                      adam_beta2=0.99, weight_decay=0.1, max_grad_norm=1.0)
# --smoke: tiny, on the CPU, so the plumbing can be checked anywhere in seconds
SMOKE_CONFIG = dict(NANOGPT_CONFIG, n_layer=1, n_head=4, n_embd=32, block_size=32, per_device_train_batch_size=8)
SMOKE_STEPS, SMOKE_SKIP, SMOKE_EVAL_BLOCKS = 10, 2, 4


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES),
                        help="which recipes to run, in this order (default: both)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps per recipe (default: 5000; --smoke: {SMOKE_STEPS})")
    parser.add_argument("--skip", type=int, default=None,
                        help=f"first steps left out of the median (compilation, warm-up; default: 100; --smoke: "
                             f"{SMOKE_SKIP})")
    parser.add_argument("--eval_blocks", type=int, default=None,
                        help="validation blocks (default: enough to cover the whole validation split; --smoke: "
                             f"{SMOKE_EVAL_BLOCKS})")
    parser.add_argument("--seed", type=int, default=1337, help="initialisation and data order (default: 1337, "
                                                              "nanoGPT's)")
    parser.add_argument("--no_bf16", action="store_true", help="train in float32 (default: bf16 autocast)")
    parser.add_argument("--no_compile", action="store_true", help="no torch.compile (default: compiled)")
    parser.add_argument("--output", default=None, help="JSON results (default: bench/results/gpu_bench.json; "
                                                       "--smoke: /tmp/nanoebm-gpu-bench/gpu_bench_smoke.json)")
    parser.add_argument("--output_root", default="/tmp/nanoebm-gpu-bench",
                        help="run folders, one per recipe (default: /tmp/nanoebm-gpu-bench)")
    parser.add_argument("--smoke", action="store_true",
                        help="a 10-step CPU check of the script itself (tiny model; its numbers mean nothing)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further run_train.py flags for every recipe (last; they override the config)")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = SMOKE_STEPS if args.smoke else 5000
    if args.skip is None:
        args.skip = SMOKE_SKIP if args.smoke else min(100, args.steps // 2)
    if args.steps < 1 or not 0 <= args.skip < args.steps:
        parser.error(f"need --steps >= 1 and 0 <= --skip < --steps (got --steps {args.steps}, --skip {args.skip})")
    if args.eval_blocks is not None and args.eval_blocks < 1:
        parser.error(f"--eval_blocks {args.eval_blocks} is invalid: must be >= 1")
    if args.output is None:
        args.output = "/tmp/nanoebm-gpu-bench/gpu_bench_smoke.json" if args.smoke else \
            str(ROOT / "bench" / "results" / "gpu_bench.json")
    return args


def validation_cover(block_size):
    """(validation characters, blocks whose targets cover all of them) for run_train's split of its corpus.

    fixed_blocks puts n blocks of block_size + 1 ids evenly over [0, last], last = chars - block_size - 1; the
    targets of consecutive blocks leave no gap when the spacing last / (n - 1) is at most block_size."""
    from nanoebm.corpus import resolve_data_path

    text = resolve_data_path(None).read_text(encoding="utf-8")  # the character tokenizer: one id per character
    chars = len(text) - int(len(text) * TRAIN_FRACTION)
    last = chars - block_size - 1
    return chars, (1 if last <= 0 else math.ceil(last / block_size) + 1)


def run_train_argv(config, recipe, args, eval_blocks, bf16, compile_):
    flags = ["--preset", "cpu" if args.smoke else "gpu"] + (["--use_cpu", "true"] if args.smoke else [])
    for key, value in config.items():
        flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    flags += [
        "--max_steps", str(args.steps), "--seed", str(args.seed), "--eval_blocks", str(eval_blocks),
        "--do_train", "true", "--do_eval", "true",
        # one evaluation, run_train's own after training: the delay past the last step stops the Trainer's
        "--eval_steps", str(args.steps), "--eval_delay", str(args.steps + 1),
        "--save_strategy", "no", "--logging_steps", str(max(1, args.steps // 10)), "--disable_tqdm", "true",
        "--report_to", "none", "--bf16", str(bf16).lower(), "--torch_compile", str(compile_).lower(),
        "--output_dir", str(Path(args.output_root) / recipe), "--overwrite_output_dir", "true",
    ]
    return flags + RECIPES[recipe] + list(args.extra)


def step_timer(skip, cuda):
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step (forward, backward, clipping, AdamW), the GPU drained at both ends."""

        def __init__(self):
            self.times = []

        def now(self):
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = self.now()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > skip:
                self.times.append(self.now() - self.started)

    return StepTimer()


def fmt(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows, smoke):
    tag = " (smoke)" if smoke else ""
    base = next((r["ms_per_step"] for r in rows if r["recipe"] == "plain_gpt"), None)
    lines = [("| recipe | System 1 bits/char | System 2 bits/char | System 1 val loss (nats) | ms/step (median) | "
              "tokens/s | peak GPU memory (GiB) | ms/step vs plain_gpt |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        memory = None if r["peak_gpu_memory_bytes"] is None else r["peak_gpu_memory_bytes"] / 2**30
        ratio = None if base is None else r["ms_per_step"] / base
        lines.append(f"| {r['recipe']}{tag}: {RECIPE_TEXT[r['recipe']]} | {fmt(r['system1_bpc'], 4)} | "
                     f"{fmt(r['system2_bpc'], 4)} | {fmt(r['system1_loss'], 4)} | {fmt(r['ms_per_step'], 1)} | "
                     f"{fmt(r['tokens_per_second'], 0)} | {fmt(memory, 2)} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


def git_commit():
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print(f"{PROG}: error: {NO_CUDA}", file=sys.stderr, flush=True)
        return 2

    import transformers

    import run_train
    from nanoebm.cli import UsageError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    config = SMOKE_CONFIG if args.smoke else NANOGPT_CONFIG
    block, batch = config["block_size"], config["per_device_train_batch_size"]
    bf16, compile_ = not (args.no_bf16 or args.smoke), not (args.no_compile or args.smoke)
    val_chars, cover = validation_cover(block)
    eval_blocks = args.eval_blocks or (SMOKE_EVAL_BLOCKS if args.smoke else cover)
    launcher = f"accelerate launch --num_processes {world} " if world > 1 else "python "
    command = launcher + "bench/gpu_bench.py" + ("" if not argv else " " + shlex.join(argv))
    nats_to_bits = 1 / math.log(2)
    result = {
        "benchmark": "nanoebm GPU benchmark: nanoGPT shakespeare_char config"
                     + (" (SMOKE: CPU, tiny model, numbers meaningless)" if args.smoke else ""),
        "smoke": args.smoke,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(0) if cuda else "CPU (smoke)",
        "processes": world,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "commit": git_commit(),
        "command": command,
        "config": dict(config, max_steps=args.steps, seed=args.seed, bf16=bf16, torch_compile=compile_,
                       min_lr_rate=0.1, skip_steps=args.skip),
        "validation": {"characters": val_chars, "eval_blocks": eval_blocks, "blocks_covering_split": cover,
                       "whole_split": eval_blocks >= cover},
        "reference": {"source": "nanoGPT README (shakespeare_char, one A100; best of evaluations every 250 steps)",
                      "val_loss_nats_per_char": NANOGPT_VAL_LOSS,
                      "val_bits_per_char": round(NANOGPT_VAL_LOSS * nats_to_bits, 4)},
        "rows": [], "failed": [], "ms_per_step_ratio_nanoebm_vs_plain_gpt": None,
    }
    output = Path(args.output)

    def write():
        if rank0:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(result, indent=1) + "\n")

    for recipe in args.recipes:
        flags = run_train_argv(config, recipe, args, eval_blocks, bf16, compile_)
        timer = step_timer(args.skip, cuda)
        gc.collect()
        if cuda:
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if rank0:
            print(f"\n== {recipe}: python run_train.py {shlex.join(flags)}", flush=True)
        started = time.perf_counter()
        try:
            metrics = run_train.main(flags, callbacks=[timer])
        except UsageError as error:  # bad flags (--extra): nothing of this recipe ran
            print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
            return 2
        except Exception as error:  # noqa: BLE001 -- a NaN loss, out of memory, ...: reported, never a row
            result["failed"].append({"recipe": recipe, "error": f"{type(error).__name__}: {str(error)[:500]}",
                                     "run_train_argv": flags})
            write()
            if rank0:
                print(f"{PROG}: {recipe} failed: {type(error).__name__}: {str(error)[:500]}", file=sys.stderr,
                      flush=True)
            continue
        wall = time.perf_counter() - started
        ms = 1000 * statistics.median(timer.times) if timer.times else None
        result["rows"].append({
            "recipe": recipe, "description": RECIPE_TEXT[recipe], "run_train_argv": flags,
            "system1_bpc": metrics.get("eval_system1_bpc"), "system2_bpc": metrics.get("eval_system2_bpc"),
            "system1_loss": metrics.get("eval_system1_loss"), "system2_loss": metrics.get("eval_system2_loss"),
            "system2_2x_bpc": metrics.get("eval_system2_2x_bpc"),
            "train_loss": metrics.get("train_loss"),
            "ms_per_step": ms, "timed_steps": len(timer.times),
            "ms_per_step_min": 1000 * min(timer.times) if timer.times else None,
            "ms_per_step_max": 1000 * max(timer.times) if timer.times else None,
            "tokens_per_second": None if not ms else batch * block * world / (ms / 1000),
            "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "wall_seconds": round(wall, 1),
        })
        write()

    times = {r["recipe"]: r["ms_per_step"] for r in result["rows"]}
    if times.get("plain_gpt") and times.get("nanoebm"):
        result["ms_per_step_ratio_nanoebm_vs_plain_gpt"] = times["nanoebm"] / times["plain_gpt"]
    write()
    if not rank0:
        return 1 if result["failed"] else 0
    ref = result["reference"]
    print(f"\n## {result['benchmark']}\n")
    print(f"device: {result['device']} x {world}; torch {result['torch']}, transformers {result['transformers']}, "
          f"Python {result['python']}; commit {result['commit']}; {result['date']}")
    print(f"config: {config['n_layer']} layers x {config['n_head']} heads x {config['n_embd']} wide, block {block}, "
          f"batch {batch} x {world} process(es), {args.steps} steps, dropout {config['dropout']}, lr "
          f"{config['learning_rate']} (warm-up {config['warmup_steps']}, cosine to a tenth), beta2 "
          f"{config['adam_beta2']}, bf16 {bf16}, torch.compile {compile_}, seed {args.seed}; ms/step: median of "
          f"steps {args.skip + 1}-{args.steps}")
    print(f"validation: {eval_blocks} blocks of {block} "
          f"({'the whole split' if eval_blocks >= cover else f'{cover} would cover the whole split'}: "
          f"{val_chars} characters), final model\n")
    if result["rows"]:
        print(table(result["rows"], args.smoke))
    else:
        print("(no recipe ran to the end: no rows)")
    print(f"\nreference (nanoGPT README, not run here): val loss {ref['val_loss_nats_per_char']} nats/char = "
          f"{ref['val_bits_per_char']:.4f} bits/char")
    ratio = result["ms_per_step_ratio_nanoebm_vs_plain_gpt"]
    if ratio is not None:
        print(f"nanoebm default / plain GPT, ms per step: {ratio:.2f}x")
    for failure in result["failed"]:
        print(f"FAILED {failure['recipe']}: {failure['error']}")
    if args.smoke:
        print("\nSMOKE run: a CPU check of the script's plumbing; these numbers are meaningless.")
    print(f"\nresults: {output}")
    print(f"reproduce: {command}")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
