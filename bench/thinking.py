#!/usr/bin/env python
"""Does thinking pay with the Energy-Based Transformer's energy? Train each recipe (nanoGPT's CPU config, 2000 steps,
the same data order per seed), then measure, side by side in one process:

- the thinking curve: validation bits/char against test-time steps (0, 1, 2, 3, 4, 8, 16) and against
  self-verification samples (1, 2, 4, 8 at the trained steps), with the plain GPT as the reference line;
- the same on an out-of-distribution text (Milton's Paradise Lost, read from ../shared/data, never committed);
- sample quality: of 8 sampled continuations of 200 characters from 20 validation prompts, the share of generated
  words found in the training text's word list, for a random pick, the lowest-energy pick and the lowest-NLL pick;
- cost: training ms/step, decoding tokens/s and FLOPs per generated token (torch's FlopCounterMode);
- System 2 against System 1 at its best temperature (fitted on half of the validation blocks, scored on the other
  half and on Milton): thinking must beat a calibrated System 1, not only System 1 at T = 1.

    python bench/thinking.py --train --variants plain_gpt default ebt_system2 ebt_system1 ebt_hybrid --seeds 0
    python bench/thinking.py --measure --variants plain_gpt default ebt_system2 ebt_system1 ebt_hybrid --seeds 0
    python bench/thinking.py --report runs/thinking/results.json

Training runs are subprocesses of run_train.py (`--jobs 2` runs two at once, one thread each); measurements run
one model at a time on `--threads` threads, so their timings compare.
"""

import argparse
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

HYBRID = ["--recipe", "ebt_hybrid"]
VARIANTS = {
    # nanoebm's own code path with thinking off and a linear landscape: plain next-token CE, the same backbone
    "plain_gpt": ["--landscape", "linear", "--use_thinking", "false", "--use_contrastive", "false"],
    "linear": ["--landscape", "linear"],  # thinking on the per-token landscape with no correction: T by construction
    "default": [],  # nanoebm's default: the mixture landscape, 2 closed-form steps, contrastive divergence
    # the best soft-token recipe of bench/ablation.py (no trust region, alpha 1), with the default contrastive term
    "soft_tokens": ["--landscape", "soft_tokens", "--think_max_move", "0", "--think_lr", "1.0"],
    # System 1 trained as the plain GPT is (its own CE alone); the thinking losses train only the energy's parameters
    "mixture_detached": ["--detach_system1", "true", "--aux_ce_weight", "0.5"],
    # a control: the linear descent starts at its own minimum and never moves, so this is System 1's CE at weight 0.5
    "linear_detached": ["--landscape", "linear", "--detach_system1", "true", "--aux_ce_weight", "0.5"],
    "ebt_system2": ["--recipe", "ebt_system2"],
    "ebt_system1": ["--recipe", "ebt_system1"],
    "ebt_hybrid": HYBRID,
    "ebt_hybrid_aux05": [*HYBRID, "--aux_ce_weight", "0.5"],
    "ebt_hybrid_aux05_steps": [*HYBRID, "--aux_ce_weight", "0.5", "--random_think_steps", "2-4", "--think_steps", "3"],
}
STEPS = (0, 1, 2, 3, 4, 8, 16)
SAMPLES = (1, 2, 4, 8)
MILTON = ROOT.parent / "shared" / "data" / "milton-paradise.txt"


def train(name, seed, args):
    out = Path(args.runs) / f"{name}-s{seed}"
    if (out / "all_results.json").is_file():
        return out
    command = [sys.executable, str(ROOT / "run_train.py"), "--preset", "cpu", "--max_steps", str(args.max_steps),
               "--seed", str(seed), "--data_seed", str(seed), "--output_dir", str(out), "--eval_blocks", "200",
               "--do_train", "true", "--do_eval", "true", "--eval_strategy", "no", "--save_strategy", "no",
               "--logging_steps", "200", "--disable_tqdm", "true", *VARIANTS[name]]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.train_threads), MKL_NUM_THREADS=str(args.train_threads))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    (Path(args.runs) / f"{name}-s{seed}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        print(f"[{name} seed {seed}] failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    print(f"[{name} seed {seed}] trained: {' '.join(command[2:])}", flush=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Measurements of one trained model


def texts():
    """(training text, validation text, Milton with characters outside the tiny Shakespeare vocabulary as spaces)."""
    from nanoebm.corpus import EMBEDDED_CORPUS

    corpus = EMBEDDED_CORPUS.read_text(encoding="utf-8")
    split = int(0.9 * len(corpus))
    vocabulary = set(corpus)
    milton = MILTON.read_text(encoding="utf-8")
    return corpus[:split], corpus[split:], "".join(c if c in vocabulary else " " for c in milton)


def blocks_of(tokenizer, text, block, n_blocks):
    import torch

    from nanoebm.corpus import fixed_blocks

    ids = torch.tensor(tokenizer(text)["input_ids"])
    return fixed_blocks(ids, block, min(n_blocks, ids.numel() // (block + 1)))


def bits_per_char(model, blocks, steps, samples=1, seed=0):
    import torch

    from nanoebm.scoring import score_blocks

    torch.manual_seed(seed)  # random starts (the paper's recipes) draw the same numbers for every setting
    scores = score_blocks(model, blocks, 64, use_thinking=steps > 0, think_steps=steps, think_samples=samples,
                          trace=False)
    return float(scores["nll2"].mean()) / math.log(2)


def thinking_curve(model, blocks):
    """bits/char at every test-time step count (G = 1) and every sample count (at the trained steps)."""
    trained = model.config.think_steps
    if not model.config.use_thinking:
        return dict(steps={0: bits_per_char(model, blocks, 0)}, samples={})
    return dict(steps={k: bits_per_char(model, blocks, k) for k in STEPS},
                samples={g: bits_per_char(model, blocks, trained, g) for g in SAMPLES})


def word_share(model, tokenizer, train_text, val_text, n_prompts=20, n=8, length=200, seed=0):
    """Share of generated words that exist in the training text, for three ways of picking one of n samples."""
    import torch

    from nanoebm.analysis import score_continuations

    known = set(re.findall(r"[a-z']+", train_text.lower()))
    block = model.config.block_size
    starts = [int(i * (len(val_text) - block - 1) / n_prompts) for i in range(n_prompts)]
    picker = random.Random(seed)
    shares = {"random": [], "lowest_energy": [], "lowest_nll": []}
    thinking = model.config.use_thinking

    def share(text):
        words = re.findall(r"[a-z']+", text.lower())
        return sum(w in known for w in words) / max(1, len(words))

    for i, start in enumerate(starts):
        prompt = torch.tensor([tokenizer(val_text[start:start + block])["input_ids"]])
        torch.manual_seed(seed + i)
        with torch.no_grad():
            out = model.generate(prompt.repeat(n, 1), max_new_tokens=length, do_sample=True, top_k=0,
                                 attention_mask=torch.ones(n, prompt.shape[1], dtype=torch.long))
        scores = score_continuations(model, out, prompt.shape[1])
        energy = scores["energy"].sum(1)  # (n,)
        logp = (scores["logp2"] if thinking else scores["logp1"]).gather(-1, scores["targets"][..., None])[..., 0]
        nll = -logp.sum(1)
        generated = [tokenizer.decode(row[prompt.shape[1]:].tolist()) for row in out]
        shares["random"].append(share(generated[picker.randrange(n)]))
        shares["lowest_energy"].append(share(generated[int(energy.argmin())]))
        shares["lowest_nll"].append(share(generated[int(nll.argmin())]))
    return {k: statistics.mean(v) for k, v in shares.items()}


def decoding_cost(model, tokenizer, val_text, new_tokens=100):
    """Greedy cached decoding, batch 1, at the trained steps: tokens/s and FLOPs per generated token."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    prompt = torch.tensor([tokenizer(val_text[1000:1000 + model.config.block_size // 2])["input_ids"]])
    kw = dict(max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    torch.manual_seed(0)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=8, do_sample=False)  # warm-up
        started = time.perf_counter()
        model.generate(prompt, **kw)
        elapsed = time.perf_counter() - started
        counter = FlopCounterMode(display=False)
        with counter:
            model.generate(prompt, **kw)
    return dict(tokens_per_s=new_tokens / elapsed, flops_per_token=counter.get_total_flops() / new_tokens)


def training_ms_per_step(name, args, steps=40, skip=10):
    """Median ms per optimizer step of run_train.py's Trainer, in this process (one variant at a time)."""
    import run_train
    from train_speed import StepTimer

    timer = StepTimer(skip)
    run_train.main(["--preset", "cpu", "--max_steps", str(steps), "--do_train", "true", "--do_eval", "false",
                    "--save_strategy", "no", "--logging_steps", str(steps), "--disable_tqdm", "true",
                    "--output_dir", f"/tmp/nanoebm-thinking-speed/{name}", "--overwrite_output_dir", "true",
                    *VARIANTS[name]], callbacks=[timer])
    return 1000 * statistics.median(timer.times)


def calibration(model, val_blocks, milton_blocks):
    """System 2 against System 1 at its best temperature, in bits/char (`scoring.against_calibrated`): T fitted on the
    even validation blocks, validation scored on the odd ones, Milton on every block at that same T."""
    from nanoebm.scoring import against_calibrated

    result = against_calibrated(model, val_blocks, milton_blocks)
    bits = 1 / math.log(2)
    return {text: {key: value * bits if key != "temperature" else value for key, value in result[part].items()}
            for text, part in (("validation", "in"), ("milton", "other"))}


def measure(name, seed, args, data):
    import torch

    from modeling_nanoebm import NanoEBMForCausalLM
    from tokenization_char import CharTokenizer

    folder = Path(args.runs) / f"{name}-s{seed}"
    result_file = folder / "thinking.json"
    record = json.loads(result_file.read_text()) if result_file.is_file() and not args.force else None
    curves_settled = args.calibration_only or (record is not None and "validation" in record)  # none asked, or kept
    if (record is not None and curves_settled and "calibration" in record
            and (not args.quality or "word_share" in record)):
        return record
    torch.set_num_threads(args.threads)
    model = NanoEBMForCausalLM.from_pretrained(folder).eval()
    tokenizer = CharTokenizer.from_pretrained(folder)
    train_text, val_text, milton = data
    block = model.config.block_size
    if record is None:
        record = dict(variant=name, seed=seed, flags=VARIANTS[name], think_steps=model.config.think_steps,
                      thinks=model.config.use_thinking, landscape=model.config.landscape)
    if "validation" not in record and not args.calibration_only:  # the curves (an earlier record keeps its own)
        started = time.perf_counter()
        record["validation"] = thinking_curve(model, blocks_of(tokenizer, val_text, block, args.eval_blocks))
        record["milton"] = thinking_curve(model, blocks_of(tokenizer, milton, block, args.milton_blocks))
        record["measure_s"] = round(time.perf_counter() - started, 1)
    if "calibration" not in record:
        record["calibration"] = calibration(model, blocks_of(tokenizer, val_text, block, args.eval_blocks),
                                            blocks_of(tokenizer, milton, block, args.milton_blocks))
    if args.quality:
        record["word_share"] = word_share(model, tokenizer, train_text, val_text)
        record.update(decoding_cost(model, tokenizer, val_text))
    result_file.write_text(json.dumps(record, indent=1))
    print(f"[{name} seed {seed}] measured", flush=True)
    return record


# ----------------------------------------------------------------------------------------------------------------
# Tables


def at(curve, steps=None, samples=None):
    table = curve["samples" if samples is not None else "steps"]
    key = samples if samples is not None else steps
    return table.get(key, table.get(str(key)))


def own_prediction(record, text):
    """bits/char at the trained steps (System 1 for a model that does not think)."""
    curve = record[text]
    return at(curve, steps=record["think_steps"] if record["thinks"] else 0)


def best_system2(record, text):
    """The lowest bits/char over more test-time steps and self-verification: (value, setting)."""
    curve = record[text]
    if not record["thinks"]:
        return at(curve, steps=0), "System 1"
    options = [(v, f"{k} steps") for k, v in curve["steps"].items() if int(k) > 0]
    options += [(v, f"{record['think_steps']} steps x {g} samples") for g, v in curve["samples"].items()]
    return min(options)


def mean_std(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report(records, args):
    calibration_table(records)
    by = {}
    for r in records:
        if "validation" in r:  # the curves (`--calibration_only` measures none)
            by.setdefault(r["variant"], []).append(r)
    if not by:
        print(f"\nreproduce: python bench/thinking.py {' '.join(sys.argv[1:])}")
        return
    plain = {r["seed"]: r for r in by.get("plain_gpt", [])}
    lines = ["| recipe | seeds | val: own (trained steps) | val: best S2 (setting) | S2 vs own | Milton: own | "
             "Milton: best S2 | S2 vs own | val vs plain GPT | Milton vs plain GPT |", "|---" * 10 + "|"]
    for name, runs in by.items():
        own_v = mean_std([own_prediction(r, "validation") for r in runs])
        own_m = mean_std([own_prediction(r, "milton") for r in runs])
        best_v = [best_system2(r, "validation") for r in runs]
        best_m = [best_system2(r, "milton") for r in runs]
        gain_v = mean_std([100 * (b[0] / own_prediction(r, "validation") - 1) for b, r in zip(best_v, runs)])
        gain_m = mean_std([100 * (b[0] / own_prediction(r, "milton") - 1) for b, r in zip(best_m, runs)])

        def vs_plain(text, runs=runs):  # paired by seed: the same initialisation seed and data order
            diffs = [100 * (own_prediction(r, text) / own_prediction(plain[r["seed"]], text) - 1)
                     for r in runs if r["seed"] in plain]
            return mean_std(diffs) if diffs else (float("nan"), 0.0)

        pv, pm = vs_plain("validation"), vs_plain("milton")
        lines.append(
            f"| {name} | {len(runs)} | {own_v[0]:.4f} ± {own_v[1]:.4f} | {mean_std([b[0] for b in best_v])[0]:.4f} "
            f"({best_v[0][1]}) | {gain_v[0]:+.2f}% | {own_m[0]:.4f} ± {own_m[1]:.4f} | "
            f"{mean_std([b[0] for b in best_m])[0]:.4f} ({best_m[0][1]}) | {gain_m[0]:+.2f}% | "
            f"{pv[0]:+.2f}% ± {pv[1]:.2f} | {pm[0]:+.2f}% ± {pm[1]:.2f} |")
    print("\n".join(lines))
    for text in ("validation", "milton"):
        print(f"\n{text}: bits/char against test-time steps (G = 1) and self-verification samples (trained steps)\n")
        print("| recipe | " + " | ".join(f"{k} steps" for k in STEPS) + " | " +
              " | ".join(f"G={g}" for g in SAMPLES) + " |")
        print("|---" * (1 + len(STEPS) + len(SAMPLES)) + "|")
        for name, runs in by.items():
            cells = []
            for k in STEPS:
                values = [at(r[text], steps=k) for r in runs]
                cells.append(f"{mean_std(values)[0]:.4f}" if None not in values else "-")
            for g in SAMPLES:
                values = [at(r[text], samples=g) for r in runs]
                cells.append(f"{mean_std(values)[0]:.4f}" if values and None not in values else "-")
            print(f"| {name} | " + " | ".join(cells) + " |")

    quality = [r for r in records if "word_share" in r]
    if quality:
        print("\nsamples (8 x 200 characters from 20 validation prompts): share of words found in the training text; "
              "cost\n")
        print("| recipe | seed | random pick | lowest-energy pick | lowest-NLL pick | decode tokens/s | MFLOPs/token | "
              "train ms/step |")
        print("|---" * 8 + "|")
        for r in quality:
            w = r["word_share"]
            ms = r.get("train_ms_per_step")
            print(f"| {r['variant']} | {r['seed']} | {100 * w['random']:.1f}% | {100 * w['lowest_energy']:.1f}% | "
                  f"{100 * w['lowest_nll']:.1f}% | {r['tokens_per_s']:.0f} | {r['flops_per_token'] / 1e6:.2f} | "
                  f"{f'{ms:.0f}' if ms else '-'} |")
    print(f"\nreproduce: python bench/thinking.py {' '.join(sys.argv[1:])}")


def calibration_table(records):
    """Each recipe's thinking against System 1 at its best temperature (fitted on the even validation blocks; the
    validation columns score the odd ones, Milton all its blocks at the same T), and against the plain GPT of the
    same seed (the same initialisation and data order) at T = 1 and at its own fitted T."""
    by = {}
    for r in records:
        if "calibration" in r:
            by.setdefault(r["variant"], []).append(r)
    plain = {r["seed"]: r["calibration"] for r in by.get("plain_gpt", [])}
    print("\nSystem 2 against calibrated System 1 (T fitted on the even validation blocks; validation scored on the "
          "odd ones, Milton at the same T), bits/char, mean ± std over seeds\n")
    print("| recipe | seeds | T | val: S1 | val: S1 at T | val: S2 | val: S2 vs calibrated S1 | val: S2 vs plain GPT "
          "(at T = 1 / at its T) | Milton: S1 at T | Milton: S2 | Milton: S2 vs calibrated S1 | Milton: S2 vs plain "
          "GPT (at T = 1 / at its T) |")
    print("|---" * 12 + "|")
    for name, runs in by.items():
        cell = {}
        for text in ("validation", "milton"):
            for key in ("temperature", "system1", "system1_calibrated", "system2"):
                cell[text, key] = mean_std([r["calibration"][text][key] for r in runs])
            cell[text, "gain"] = mean_std([100 * (r["calibration"][text]["system2"]
                                                  / r["calibration"][text]["system1_calibrated"] - 1) for r in runs])
            for key in ("system1", "system1_calibrated"):  # paired by seed
                diffs = [100 * (r["calibration"][text]["system2"] / plain[r["seed"]][text][key] - 1)
                         for r in runs if r["seed"] in plain]
                cell[text, "plain", key] = mean_std(diffs) if diffs else (math.nan, 0.0)

        def gain(text, cell=cell):
            return f"{cell[text, 'gain'][0]:+.2f}% ± {cell[text, 'gain'][1]:.2f}"

        def vs_plain(text, cell=cell):
            (at_one, spread), at_its_t = cell[text, "plain", "system1"], cell[text, "plain", "system1_calibrated"][0]
            return f"{at_one:+.2f}% ± {spread:.2f} / {at_its_t:+.2f}%"

        print(f"| {name} | {len(runs)} | {cell['validation', 'temperature'][0]:.2f} | "
              f"{cell['validation', 'system1'][0]:.4f} | {cell['validation', 'system1_calibrated'][0]:.4f} | "
              f"{cell['validation', 'system2'][0]:.4f} | {gain('validation')} | {vs_plain('validation')} | "
              f"{cell['milton', 'system1_calibrated'][0]:.4f} | {cell['milton', 'system2'][0]:.4f} | "
              f"{gain('milton')} | {vs_plain('milton')} |")


def plot(records, path):
    """bits/char against test-time steps, validation and Milton side by side, the plain GPT as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {}
    for r in records:
        by.setdefault(r["variant"], []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, text, title in zip(axes, ("validation", "milton"), ("tiny Shakespeare validation", "Milton (out of "
                                                                                                 "distribution)")):
        for name, runs in by.items():
            if not runs[0]["thinks"]:
                ax.axhline(mean_std([at(r[text], steps=0) for r in runs])[0], color="black", ls="--", label=name)
                continue
            ks = [k for k in STEPS if k > 0]
            values = [mean_std([at(r[text], steps=k) for r in runs])[0] for k in ks]
            off = min(values) > 4.0  # the paper's recipes at this scale: named, with their range, off the axes
            ax.plot(ks, values, marker="o", label=f"{name} (off the scale: {min(values):.2f}-{max(values):.2f})"
                    if off else name)
        ax.set_xscale("log", base=2)
        ax.set_xticks([k for k in STEPS if k > 0], [str(k) for k in STEPS if k > 0])
        ax.set_xlabel("thinking steps at test time")
        ax.set_ylabel("bits per character")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    low = min(min(at(r[t], steps=0) for r in records if not r["thinks"]) for t in ("validation", "milton"))
    for ax in axes:
        ax.set_ylim(low - 0.1, low + 0.6)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def trained_runs(args):
    """(name, seed, folder) of every requested run that finished training, seed by seed."""
    for seed in args.seeds:
        for name in args.variants:
            folder = Path(args.runs) / f"{name}-s{seed}"
            if (folder / "all_results.json").is_file():
                yield name, seed, folder


def noise_sweep(args, samples=4):
    """Is self-verification's start noise (think_samples_noise_std; 1.0 was the first default) why it does not pay?
    Validation bits/char at the trained steps with one descent and with `samples` descents per position at each
    noise std."""
    import torch

    from modeling_nanoebm import NanoEBMForCausalLM
    from tokenization_char import CharTokenizer

    torch.set_num_threads(args.threads)
    _, val_text, _ = texts()
    print("| run | one descent | " + " | ".join(f"G={samples}, std {std:g}" for std in args.noise_sweep) + " |")
    print("|---|---|" + "---|" * len(args.noise_sweep))
    for name, seed, folder in trained_runs(args):
        model = NanoEBMForCausalLM.from_pretrained(folder).eval()
        if not model.config.use_thinking:
            continue
        blocks = blocks_of(CharTokenizer.from_pretrained(folder), val_text, model.config.block_size, args.eval_blocks)
        steps, cells = model.config.think_steps, []
        one = bits_per_char(model, blocks, steps)
        for std in args.noise_sweep:
            model.config.think_samples_noise_std = std
            cells.append(f"{bits_per_char(model, blocks, steps, samples):.4f}")
        print(f"| {name}-s{seed} ({steps} steps) | {one:.4f} | " + " | ".join(cells) + " |", flush=True)
    print("\nreproduce: python bench/thinking.py " + " ".join(sys.argv[1:]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["plain_gpt", "default", "ebt_system2", "ebt_system1",
                                                          "ebt_hybrid"], choices=sorted(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--train", action="store_true", help="train the missing runs")
    parser.add_argument("--measure", action="store_true", help="measure the trained runs")
    parser.add_argument("--quality", action="store_true", help="also word share, decoding and training cost")
    parser.add_argument("--report", help="print the tables of a saved results file")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "thinking"))
    parser.add_argument("--max_steps", type=int, default=2000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--train_threads", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval_blocks", type=int, default=500, help="evenly spaced validation blocks")
    parser.add_argument("--milton_blocks", type=int, default=500)
    parser.add_argument("--force", action="store_true", help="measure again")
    parser.add_argument("--calibration_only", action="store_true",
                        help="measure only System 2 against calibrated System 1 (no thinking curves)")
    parser.add_argument("--plot", help="write the thinking curves to this PNG")
    parser.add_argument("--noise_sweep", nargs="+", type=float, metavar="STD",
                        help="only: validation bits/char with G=4 self-verification samples at each start-noise std")
    args = parser.parse_args()
    if args.report:
        records = json.loads(Path(args.report).read_text())
        report(records, args)
        if args.plot:
            plot(records, args.plot)
        return
    if not MILTON.is_file():
        sys.exit(f"{MILTON} is missing: the out-of-distribution text is read from ../shared/data")
    if args.noise_sweep:
        noise_sweep(args)
        return
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    jobs = [(name, seed) for seed in args.seeds for name in args.variants]
    if args.train:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: train(*job, args), jobs))
    if not args.measure:
        return
    data = texts()
    records = []
    for name, seed, folder in trained_runs(args):
        record = measure(name, seed, args, data)
        if args.quality and "train_ms_per_step" not in record:
            record["train_ms_per_step"] = training_ms_per_step(name, args)
            (folder / "thinking.json").write_text(json.dumps(record, indent=1))
        records.append(record)
    results = Path(args.runs) / "results.json"
    results.write_text(json.dumps(records, indent=1))
    report(records, args)
    if args.plot:
        plot(records, args.plot)


if __name__ == "__main__":
    main()
