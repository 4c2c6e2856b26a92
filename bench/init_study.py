#!/usr/bin/env python
"""Which residual-projection init trains best? The attention and MLP output projections (`c_proj`) start at std
initializer_range / (2 n_layer) ** p: p = 0.5 is nanoGPT's (GPT-2's) scaled init, 0 the plain initializer_range.
For each p, seed and model (the plain GPT, and nanoebm's default recipe at the same init) this trains nanoGPT's CPU
config (4x128, block 64, batch 12, 2000 steps, lr 1e-3, dropout 0; --n_layer/--n_head/--n_embd widen it, e.g.
to the GPU preset's 6x384) through run_train.py, one run at a time on one thread, then scores every saved model
teacher-forced over the whole validation split of the embedded tiny Shakespeare (its last 10%) in non-overlapping
64-character windows, nats per character:

- System 1 (thinking off) and System 2 (the model's own thinking) over all windows;
- on the odd-indexed windows: System 1, System 2 and System 1 at its best temperature T (calibrated System 1, T
  fitted on the even-indexed windows), so the three compare on the same text.

    python bench/init_study.py                                  # train what is missing, score, print, write JSON
    python bench/init_study.py --seeds 0 --powers 0.5 0         # a part of the grid
    python bench/init_study.py --report bench/results/init_study.json
    python bench/init_study.py --n_layer 6 --n_head 6 --n_embd 384 --max_steps 1000 --powers 0.5 0
                                # runs in ../init-runs-6x384-1000steps, results in init_study_6x384-1000steps.json

A run whose folder (under --runs, outside the repository) holds a model is not trained again.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanoebm.settings import PRESETS  # noqa: E402  (after the path: the bench runs from a checkout)

MODELS = {
    # nanoebm's own code path as nanoGPT: linear landscape, thinking and contrastive divergence off (plain CE)
    "plain_gpt": ["--landscape", "linear", "--use_thinking", "false", "--use_contrastive", "false"],
    "default": [],  # the default recipe: mixture landscape, 2 thinking steps, contrastive divergence
}
POWERS = (0.5, 0.0, 0.25)  # the two ends first
BLOCK = 64
CPU = {key: PRESETS["cpu"][key] for key in ("n_layer", "n_head", "n_embd", "max_steps")}  # the study's default set-up


def folder_of(args, model, power, seed) -> Path:
    return Path(args.runs) / f"{model}-p{power:g}-s{seed}"


def train(args, model, power, seed) -> Path | None:
    """Train one run in a subprocess on one thread (skipped when its folder already holds a model)."""
    out = folder_of(args, model, power, seed)
    if (out / "model.safetensors").is_file():
        return out
    if out.exists():
        shutil.rmtree(out)  # a run stopped before it saved: start it again
    size = ["--n_layer", str(args.n_layer), "--n_head", str(args.n_head), "--n_embd", str(args.n_embd)]
    command = [sys.executable, str(ROOT / "run_train.py"), "--preset", "cpu", *size, "--max_steps", str(args.max_steps),
               "--seed", str(seed), "--data_seed", str(seed), "--residual_init_power", f"{power:g}",
               "--output_dir", str(out), "--do_train", "true", "--do_eval", "false", "--save_strategy", "no",
               "--eval_blocks", str(args.eval_blocks), "--logging_steps", "200", "--dataloader_num_workers", "0",
               "--report_to", "none", "--disable_tqdm", "true", *MODELS[model]]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    start = time.time()
    with open(f"{out}.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        print(f"[{out.name}] failed: see {out}.log", file=sys.stderr)
        return None
    print(f"[{out.name}] trained in {time.time() - start:.0f} s: {' '.join(command[2:])}", flush=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Scoring: teacher-forced nats per character over non-overlapping windows


def validation_windows(tokenizer):
    """The whole validation split (the last 10% of the embedded text) as non-overlapping windows of BLOCK + 1 ids
    (each window's BLOCK characters are scored with the ones before them in the window as context)."""
    import torch

    from nanoebm.corpus import EMBEDDED_CORPUS

    text = EMBEDDED_CORPUS.read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text[int(0.9 * len(text)):])["input_ids"])
    n = (ids.numel() - 1) // BLOCK
    return torch.stack([ids[i * BLOCK: i * BLOCK + BLOCK + 1] for i in range(n)])


def logits_of(model, windows, system2: bool):
    """Teacher-forced logits (N, BLOCK, V) of System 1 (thinking off) or System 2 (the model's own thinking)."""
    import torch

    out = []
    with torch.no_grad():
        for batch in windows.split(64):
            thinking = system2 and model.config.use_thinking
            out.append(model(batch[:, :-1], use_thinking=thinking, return_energy_trace=False).logits.float())
    return torch.cat(out)


def nats(logits, windows, temperature=1.0) -> float:
    import torch.nn.functional as F

    return F.cross_entropy((logits / temperature).transpose(1, 2), windows[:, 1:]).item()


def best_temperature(logits, windows) -> float:
    """The T that minimises System 1's nats/char on these windows (golden-section search on log T in [1/4, 4])."""
    lo, hi = math.log(0.25), math.log(4.0)
    golden = (math.sqrt(5) - 1) / 2
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fa, fb = nats(logits, windows, math.exp(a)), nats(logits, windows, math.exp(b))
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - golden * (hi - lo)
            fa = nats(logits, windows, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + golden * (hi - lo)
            fb = nats(logits, windows, math.exp(b))
    return math.exp((lo + hi) / 2)


def score(model, windows) -> dict:
    """nats/char of System 1 and System 2 over all windows, and on the odd-indexed windows System 1, System 2 and
    System 1 at the temperature fitted on the even-indexed ones."""
    model.eval()
    s1, s2 = logits_of(model, windows, False), logits_of(model, windows, True)
    fit, held = slice(0, None, 2), slice(1, None, 2)
    temperature = best_temperature(s1[fit], windows[fit])
    return {"system1": nats(s1, windows), "system2": nats(s2, windows),
            "odd_system1": nats(s1[held], windows[held]), "odd_system2": nats(s2[held], windows[held]),
            "odd_system1_calibrated": nats(s1[held], windows[held], temperature), "temperature": temperature,
            "windows": len(windows)}


def score_folder(folder: Path) -> dict:
    """Score one saved model (cached in its folder as init_score.json)."""
    cached = folder / "init_score.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    result = score(model, validation_windows(tokenizer))
    cached.write_text(json.dumps(result, indent=1))
    return result


# ----------------------------------------------------------------------------------------------------------------
# Report


COLUMNS = (("system1", "System 1"), ("system2", "System 2"), ("odd_system1", "odd: System 1"),
           ("odd_system1_calibrated", "odd: calibrated System 1"), ("odd_system2", "odd: System 2"))


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report(records, command):
    """Mean ± std over seeds per cell, the change against nanoGPT's p = 0.5 paired by seed, and every seed's values."""
    cells = {}
    for r in records:
        cells.setdefault((r["model"], r["power"]), {})[r["seed"]] = r
    order = sorted(cells, key=lambda cell: (cell[0] != "plain_gpt", cell[0], -cell[1]))
    print("nats/char, mean ± std over seeds; odd: the odd-indexed windows, T fitted on the even-indexed ones\n")
    print("| model | p | seeds | " + " | ".join(title for _, title in COLUMNS) + " | T | System 2 vs p=0.5 |")
    print("|---|---:|---|" + "---:|" * (len(COLUMNS) + 2))
    for cell in order:
        runs = cells[cell]
        row = [cell[0], f"{cell[1]:g}", ",".join(map(str, sorted(runs)))]
        for key in [key for key, _ in COLUMNS] + ["temperature"]:
            mean, std = mean_std([r[key] for r in runs.values()])
            row.append(f"{mean:.4f} ± {std:.4f}")
        nanogpt = cells.get((cell[0], 0.5), {})
        paired = [100 * (r["system2"] / nanogpt[seed]["system2"] - 1) for seed, r in runs.items() if seed in nanogpt]
        row.append(f"{mean_std(paired)[0]:+.2f}% ± {mean_std(paired)[1]:.2f}" if paired and cell[1] != 0.5 else "-")
        print("| " + " | ".join(row) + " |")
    print("\nper seed: System 1 / System 2 / odd: calibrated System 1 / odd: System 2\n")
    print("| model | p | seed | System 1 | System 2 | odd: calibrated System 1 | odd: System 2 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for cell in order:
        for seed, r in sorted(cells[cell].items()):
            print(f"| {cell[0]} | {cell[1]:g} | {seed} | {r['system1']:.4f} | {r['system2']:.4f} | "
                  f"{r['odd_system1_calibrated']:.4f} | {r['odd_system2']:.4f} |")
    print(f"\nreproduce: {command}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--powers", nargs="+", type=float, default=list(POWERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted(MODELS))
    for key in ("n_layer", "n_head", "n_embd"):
        parser.add_argument(f"--{key}", type=int, default=CPU[key])
    parser.add_argument("--runs", help="model folders, outside the repo (default: ../init-runs, and "
                        "../init-runs-<n_layer>x<n_embd>[-<max_steps>steps] for another size or length, so two "
                        "set-ups never share a folder)")
    parser.add_argument("--max_steps", type=int, default=CPU["max_steps"])
    parser.add_argument("--eval_blocks", type=int, default=1716, help="validation blocks run_train.py draws (it "
                        "does not evaluate: the models are scored here)")
    parser.add_argument("--train_only", action="store_true", help="train the missing runs, score nothing")
    parser.add_argument("--no_train", action="store_true", help="score and report the runs trained so far")
    parser.add_argument("--report", help="print the table of a saved results file")
    parser.add_argument("--out", help="results JSON (default: bench/results/init_study.json, and "
                        "init_study_<n_layer>x<n_embd>[-<max_steps>steps].json for another size or length)")
    args = parser.parse_args()
    tag = ""  # names another set-up's runs folder and results file
    if any(getattr(args, key) != value for key, value in CPU.items()):
        longer = args.max_steps != CPU["max_steps"]
        tag = f"{args.n_layer}x{args.n_embd}" + (f"-{args.max_steps}steps" if longer else "")
    args.runs = args.runs or str(ROOT.parent / ("init-runs" + (f"-{tag}" if tag else "")))
    args.out = args.out or str(ROOT / "bench" / "results" / ("init_study" + (f"_{tag}" if tag else "") + ".json"))
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        report(saved["records"], saved["command"])
        return
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    records = []
    for seed in args.seeds:  # every cell once before any second seed
        for power in args.powers:
            for model in args.models:
                folder = folder_of(args, model, power, seed) if args.no_train else train(args, model, power, seed)
                if folder and (folder / "model.safetensors").is_file() and not args.train_only:
                    records.append({"model": model, "power": power, "seed": seed, **score_folder(folder)})
    if args.train_only:
        return
    command = "python bench/init_study.py " + " ".join(sys.argv[1:])
    Path(args.out).write_text(json.dumps({"command": command.strip(), "records": records}, indent=1))
    report(records, command.strip())


if __name__ == "__main__":
    main()
