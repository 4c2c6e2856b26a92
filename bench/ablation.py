#!/usr/bin/env python
"""Does thinking pay? Train each variant with run_train.py (nanoGPT's CPU config by default), several seeds, and
report validation bits per character of System 1 and System 2 (at the trained and at test-time step counts), each
variant against its base seed by seed, System 2's gain on the training text beside it, the energy gap and the cost
(ms per training step, characters per second when evaluating).

    python bench/ablation.py --variants plain_gpt kl cd --seeds 0 1 2 --max_steps 2000
    python bench/ablation.py --collect --variants all --plot docs/thinking_steps.png   # tables + plot from runs/
    python bench/ablation.py --report bench/results/ablation.json                      # tables from saved results

Every run sees the same data order (seed) and the same fixed validation blocks; the plain GPT is nanoebm's own
code path with thinking off and a linear landscape (plain next-token CE), so the comparison is like for like.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Levers are measured one at a time against a base recipe, and every variant names its entropy_weight so the table
# does not depend on the defaults. Bases: `kl` (lambda = tau = 1: J = tau * KL(p || softmax(-E / tau)) + const, so on
# a fixed landscape System 1 is already the minimum and thinking moves only where the belief-dependent correction
# says so), `kl_free` (kl without the trust region, alpha 1), `kl_natural` (mirror-descent steps, no trust region);
# `research` is the research code's lambda = 0.1.
KL = ["--entropy_weight", "1.0"]
KL_FREE = KL + ["--think_max_move", "0", "--think_lr", "1.0"]
KL_NATURAL = KL + ["--think_max_move", "0", "--think_lr", "0.5", "--think_gradient", "natural"]
VARIANTS = {
    "plain_gpt": ["--landscape", "linear", "--use_thinking", "false"],
    "research": ["--entropy_weight", "0.1"],
    "no_trust_region": ["--think_max_move", "0", "--entropy_weight", "0.1"],  # against research
    "kl": KL,
    # the landscape
    "linear_think": KL + ["--landscape", "linear"],
    "soft_tokens": ["--landscape", "soft_tokens", "--entropy_weight", "0.1"],  # against research
    "kl_free_soft": KL_FREE + ["--landscape", "soft_tokens"],  # against kl_free
    "open_gate": KL + ["--correction_scale_init", "0.5"],
    # the descent: step size, steps, gradient, trust region
    "kl_free": KL_FREE,
    "kl_free_steps4": KL_FREE + ["--think_steps", "4"],
    "steps_4": KL + ["--think_steps", "4"],
    "random_steps": KL + ["--random_think_steps", "1-3"],
    "alpha_fixed": KL + ["--think_lr_learnable", "false"],
    "coupled": KL + ["--mixture_stopgrad", "false"],  # second-order, through the math SDPA kernel
    "kl_natural": KL_NATURAL,
    # natural steps at alpha 1 land on softmax(-E(. | p)): the correction reaches the logits in full
    "nat_open": KL + ["--think_max_move", "0", "--think_lr", "1.0", "--think_gradient", "natural",
                      "--correction_scale_init", "0.5"],
    # the start of the descent (natural steps: from a flat or random start plain steps barely move, dJ/dv ~ p)
    "init_zeros": KL_NATURAL + ["--think_init", "zeros"],
    "init_random": KL_NATURAL + ["--think_init", "random", "--think_init_noise_std", "1.0"],
    # EBT's replay buffer: a quarter of the rows resume the descent of a stored block from its refined logits
    "replay": KL + ["--think_replay_prob", "0.25"],
    # gradients through the chain
    "truncate": KL + ["--truncate_refine", "true"],
    "detach": KL + ["--detach_refine", "true"],
    "langevin": KL + ["--langevin_noise", "0.05"],
    # the losses
    "aux_0": KL + ["--aux_ce_weight", "0"],
    "aux_0.5": KL + ["--aux_ce_weight", "0.5"],
    "entropy_0": ["--entropy_weight", "0"],
    # contrastive terms (energy-magnitude stabiliser weight 1.0 unless named)
    "cd": KL + ["--contrastive_type", "cd"],
    "pcd": KL + ["--contrastive_type", "pcd", "--contrastive_reg_weight", "0.01"],
    "pcd_reg1": KL + ["--contrastive_type", "pcd", "--contrastive_reg_weight", "1.0"],
    "pcd_w0.01": KL + ["--contrastive_type", "pcd", "--contrastive_weight", "0.01", "--contrastive_reg_weight", "0.01"],
    "fast_pcd": KL + ["--contrastive_type", "fast_pcd"],
    "cd_w0.3": KL + ["--contrastive_type", "cd", "--contrastive_weight", "0.3"],
    "cd_open": KL + ["--contrastive_type", "cd", "--correction_scale_init", "0.5"],
    "cd_soft": KL_FREE + ["--landscape", "soft_tokens", "--contrastive_type", "cd"],
    # the control for cd: the same contrastive term on a plain GPT (System 1 only, no thinking)
    "plain_cd": ["--landscape", "linear", "--use_thinking", "false", "--contrastive_type", "cd"],
    "plain_cd_w0.3": ["--landscape", "linear", "--use_thinking", "false", "--contrastive_type", "cd",
                      "--contrastive_weight", "0.3"],
}
# What each variant changes from (its row in the table is compared with that one, seed by seed)
BASES = {
    "kl": "plain_gpt", "research": "kl", "no_trust_region": "research", "soft_tokens": "research",
    "linear_think": "kl", "open_gate": "kl", "kl_free": "kl", "steps_4": "kl", "random_steps": "kl",
    "alpha_fixed": "kl", "coupled": "kl", "replay": "kl", "truncate": "kl", "detach": "kl", "langevin": "kl",
    "aux_0": "kl", "aux_0.5": "kl", "entropy_0": "kl", "cd": "kl", "fast_pcd": "kl", "pcd_reg1": "kl",
    "pcd": "pcd_reg1", "pcd_w0.01": "pcd", "kl_free_soft": "kl_free", "kl_free_steps4": "kl_free",
    "kl_natural": "kl_free", "nat_open": "kl_natural", "init_zeros": "kl_natural", "init_random": "kl_natural",
    "cd_w0.3": "cd", "cd_open": "cd", "cd_soft": "kl_free_soft", "plain_cd": "plain_gpt", "plain_cd_w0.3": "plain_cd",
}

DEFAULT = "cd"  # the recipe run_train.py trains with no flags: kl thinking plus contrastive divergence
LABELS = {"cd": "default: thinking + cd", "kl": "thinking, no contrastive (previous default)",
          "research": "research defaults (lambda = 0.1)", "plain_gpt": "plain GPT",
          "plain_cd": "plain GPT + the same cd term", "cd_w0.3": "thinking + cd at weight 0.3",
          "kl_free_soft": "soft tokens, no trust region"}


def flags(name):
    """run_train.py flags of a variant. run_train.py trains with cd unless told otherwise; a variant that names no
    contrastive type runs without it, as it was measured."""
    extra = VARIANTS[name]
    return extra if "--contrastive_type" in extra else [*extra, "--use_contrastive", "false"]


TEST_TIME_STEPS = (0, 1, 2, 4, 8)


def run_one(name, seed, args):
    out = Path(args.runs) / f"{name}-s{seed}"
    result_file = out / "ablation.json"
    if result_file.is_file() and not (args.force or args.resweep):
        return with_train_text(json.loads(result_file.read_text()), result_file, args)
    command = [sys.executable, str(ROOT / "run_train.py"), "--preset", args.preset, "--max_steps", str(args.max_steps),
               "--seed", str(seed), "--data_seed", str(seed), "--output_dir", str(out),
               "--eval_blocks", str(args.eval_blocks),
               "--do_train", "true", "--do_eval", "true", "--eval_strategy", "no", "--save_strategy", "no",
               "--logging_steps", str(max(1, args.max_steps // 10)), "--disable_tqdm", "true",
               *flags(name), *(["--overwrite_output_dir", "true"] if args.force else []), *args.extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    started = time.time()
    if not (out / "all_results.json").is_file() or args.force:  # a finished training run is only re-measured
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"[{name} seed {seed}] failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            return None
    metrics = json.loads((out / "all_results.json").read_text())
    model, train_ids, blocks = load_trained(out, args)
    record = dict(variant=name, seed=seed, command=" ".join(command[1:]), wall_s=round(time.time() - started, 1),
                  ms_per_step=1000 * metrics["train_runtime"] / args.max_steps, train_metrics=metrics,
                  think_steps=model.config.think_steps, thinks=model.config.use_thinking,
                  test_time=test_time_sweep(model, blocks))
    record["train_text"] = training_text_bpc(model, train_ids, trained_steps(record))
    record["calibrated"] = calibrated_bpc(model, blocks)
    result_file.write_text(json.dumps(record, indent=2))
    s2 = metrics.get("eval_system2_bpc", float("nan"))
    print(f"[{name} seed {seed}] S1 {metrics['eval_system1_bpc']:.4f} S2 {s2:.4f} bpc, {record['ms_per_step']:.1f} "
          f"ms/step", flush=True)
    return record


def load_trained(folder, args):
    """A trained model (eval mode), its training text and the fixed validation blocks, read once per run."""
    import torch

    import run_train
    from modeling_nanoebm import NanoEBMForCausalLM
    from nanoebm.data import build_data
    from tokenization_char import CharTokenizer

    torch.set_num_threads(args.threads)
    model = NanoEBMForCausalLM.from_pretrained(folder).eval()
    train, blocks, _ = build_data(run_train.DataArguments(eval_blocks=args.eval_blocks),
                                  CharTokenizer.from_pretrained(folder), model.config.block_size, 0)
    return model, train.ids, blocks


def test_time_sweep(model, blocks):
    """Validation bits/char of one trained model at 0, 1, 2, 4, 8 thinking steps, with characters/s (of the scoring
    pass, which computes no energy) and the energy gap J0 - JK (from a second, untimed pass)."""
    from nanoebm.scoring import score_blocks

    sweep = {}
    for steps in TEST_TIME_STEPS:
        started = time.perf_counter()
        scores = score_blocks(model, blocks, 64, use_thinking=steps > 0, think_steps=steps, trace=False)
        elapsed = time.perf_counter() - started
        gap = 0.0
        if steps > 0:  # the energy gap J0 - JK, outside the timing (it costs one more landscape evaluation)
            trace = score_blocks(model, blocks, 64, think_steps=steps)["trace"]
            gap = float((trace[..., 0] - trace[..., -1]).mean())
        count = scores["nll2"].numel()
        sweep[steps] = dict(bpc=float(scores["nll2"].mean()) / math.log(2), chars_per_s=count / elapsed,
                            energy_gap=gap)
    return sweep


def training_text_bpc(model, train_ids, steps, n_blocks=400):
    """System 1 and System 2 bits/char on evenly spaced blocks of the TRAINING text: set beside validation, it shows
    whether what thinking learned generalises or only fits the text it was trained on."""
    from nanoebm.corpus import fixed_blocks
    from nanoebm.scoring import score_blocks

    blocks = fixed_blocks(train_ids, model.config.block_size, n_blocks)
    scores = score_blocks(model, blocks, 64, use_thinking=steps > 0, think_steps=steps, trace=False)
    return {"s1": float(scores["nll1"].mean()) / math.log(2), "s2": float(scores["nll2"].mean()) / math.log(2)}


def trained_steps(record):
    return record["think_steps"] if record["thinks"] else 0


def calibrated_bpc(model, blocks):
    """System 2 against System 1 at its best temperature, bits/char (`scoring.against_calibrated`: T fitted on the
    even validation blocks, both scored on the odd ones)."""
    from nanoebm.scoring import against_calibrated

    result = against_calibrated(model, blocks)["in"]
    return {key: value / math.log(2) if key != "temperature" else value for key, value in result.items()}


def with_train_text(record, result_file, args):
    """The record with its training-text and calibration columns: runs measured before those existed get them (and
    are saved)."""
    if "train_text" not in record or "calibrated" not in record:
        model, train_ids, blocks = load_trained(Path(result_file).parent, args)
        record["train_text"] = training_text_bpc(model, train_ids, trained_steps(record))
        record["calibrated"] = calibrated_bpc(model, blocks)
        Path(result_file).write_text(json.dumps(record, indent=2))
    return record


def summarise(records):
    by_variant = {}
    for record in records:
        by_variant.setdefault(record["variant"], []).append(record)
    rows = []
    for name, runs in by_variant.items():
        def stat(values):
            values = [v for v in values if v is not None and not math.isnan(v)]
            if not values:
                return float("nan"), float("nan")
            return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

        def at(r, k):  # validation of the saved model, reloaded: the same fixed blocks for every variant
            k = 0 if not r.get("thinks", True) else k
            return (r["test_time"].get(str(k)) or r["test_time"].get(k) or {})

        K = runs[0].get("think_steps", 2)
        s1 = stat([at(r, 0).get("bpc") for r in runs])
        s2 = stat([at(r, K).get("bpc") for r in runs])
        s2x = stat([at(r, 2 * K).get("bpc") for r in runs])
        gap = stat([at(r, K).get("energy_gap", float("nan")) for r in runs])
        ms = stat([r["ms_per_step"] for r in runs])
        train_gain = stat([100 * (r["train_text"]["s2"] / r["train_text"]["s1"] - 1) if "train_text" in r
                           else float("nan") for r in runs])
        vs_calibrated = stat([100 * (r["calibrated"]["system2"] / r["calibrated"]["system1_calibrated"] - 1)
                              if "calibrated" in r else float("nan") for r in runs])
        rows.append(dict(variant=name, seeds=len(runs), s1=s1, s2=s2, s2x=s2x, gap=gap, ms=ms, train_gain=train_gain,
                         vs_calibrated=vs_calibrated,
                         s2_by_seed={r["seed"]: at(r, K).get("bpc") for r in runs},
                         sweep={k: stat([r["test_time"][str(k)]["bpc"] if str(k) in r["test_time"]
                                         else r["test_time"][k]["bpc"] for r in runs]) for k in TEST_TIME_STEPS},
                         chars_s={k: stat([(r["test_time"].get(str(k)) or r["test_time"][k])["chars_per_s"]
                                           for r in runs]) for k in TEST_TIME_STEPS},
                         think_steps=runs[0].get("think_steps")))
    return rows


def paired(row, base):
    """S2 of `row` against its base recipe trained with the same seed (same initialisation and data order): mean and
    std of the per-seed differences in %, and how many seeds both have. Between two thinking recipes pairing removes
    most of the seed noise; against the plain GPT (a different head, so a different trajectory) it does not."""
    diffs = [100 * (s2 / base["s2_by_seed"][seed] - 1) for seed, s2 in row["s2_by_seed"].items()
             if seed in base["s2_by_seed"]]
    if not diffs:
        return "-"
    spread = f" ± {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
    return f"{statistics.mean(diffs):+.2f}%{spread} (n={len(diffs)})"


def base_cell(row, by_name):
    name = BASES.get(row["variant"])
    return f"{paired(row, by_name[name])} vs {name}" if name in by_name else "-"


def markdown(rows):
    base = next((r for r in rows if r["variant"] == "plain_gpt"), None)
    by_name = {r["variant"]: r for r in rows}
    lines = ["| variant | seeds | System 1 bpc | System 2 bpc | S2 vs S1 | S2 vs calibrated S1 | S2 vs plain GPT | "
             "S2 vs its base, same seeds | S2 at 2x steps | S2 vs S1 on training text | energy gap | ms/step | "
             "eval chars/s (K) |", "|---" * 13 + "|"]
    for r in rows:
        vs_s1 = 100 * (r["s2"][0] / r["s1"][0] - 1)
        vs_gpt = 100 * (r["s2"][0] / base["s1"][0] - 1) if base else float("nan")
        lines.append(
            f"| {r['variant']} | {r['seeds']} | {r['s1'][0]:.4f} ± {r['s1'][1]:.4f} | "
            f"{r['s2'][0]:.4f} ± {r['s2'][1]:.4f} | {vs_s1:+.2f}% | {r['vs_calibrated'][0]:+.2f}% | {vs_gpt:+.2f}% | "
            f"{base_cell(r, by_name)} | {r['s2x'][0]:.4f}"
            f" | {r['train_gain'][0]:+.2f}% | {r['gap'][0]:.4f} | {r['ms'][0]:.1f} | "
            f"{r['chars_s'][2][0]:.0f} |")
    sweep = ["", "Validation bits/char against test-time thinking steps (mean over seeds):", "",
             "| variant | " + " | ".join(f"K={k}" for k in TEST_TIME_STEPS) + " |",
             "|---|" + "---|" * len(TEST_TIME_STEPS)]
    for r in rows:
        sweep.append(f"| {r['variant']} | " + " | ".join(f"{r['sweep'][k][0]:.4f}" for k in TEST_TIME_STEPS) + " |")
    return "\n".join(lines + sweep)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {r["variant"]: r for r in rows}
    thinking = [r for r in rows if r.get("think_steps") and not r["variant"].startswith("plain")]
    if not thinking:
        return
    # the default, the previous default and the research code's, plus the best recipe among those measured on the
    # most seeds (a lucky single seed is not a finding)
    most = max(r["seeds"] for r in thinking)
    best = min((r for r in thinking if r["seeds"] == most), key=lambda r: r["s2"][0])
    names = [n for n in (DEFAULT, "kl", "research", best["variant"]) if n in by_name]
    fig, ax = plt.subplots(figsize=(6.8, 4.0), dpi=110)
    ks = list(TEST_TIME_STEPS)
    for name in dict.fromkeys(names):
        r = by_name[name]
        ax.errorbar(ks, [r["sweep"][k][0] for k in ks], yerr=[r["sweep"][k][1] for k in ks], marker="o", capsize=3,
                    label=f"{LABELS.get(name, name)}, {r['seeds']} seed(s), trained K={r['think_steps']}")
    for name, color in (("plain_gpt", "gray"), ("plain_cd", "tab:brown")):
        if name in by_name:
            mean, std = by_name[name]["s1"]
            ax.axhline(mean, color=color, ls="--", label=f"{LABELS[name]}, {by_name[name]['seeds']} seeds (+-1 std)")
            ax.axhspan(mean - std, mean + std, color=color, alpha=0.12)
    ax.set_xlabel("thinking steps at test time (0 = System 1)")
    ax.set_ylabel("validation bits per char")
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.savefig(path, bbox_inches="tight")
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["plain_gpt", "kl"], choices=sorted(VARIANTS) + ["all"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=2000)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--eval_blocks", type=int, default=1700, help="fixed validation blocks (1700 ~ all of it)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "ablation"))
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "ablation.json"))
    parser.add_argument("--plot", default=None, help="PNG of bits/char against test-time steps")
    parser.add_argument("--report", default=None, help="only summarise this results JSON")
    parser.add_argument("--collect", action="store_true",
                        help="summarise every finished run under --runs (for --variants, or all with --variants all)")
    parser.add_argument("--force", action="store_true", help="rerun runs that already have results")
    parser.add_argument("--resweep", action="store_true", help="re-measure finished runs without retraining")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more run_train.py flags for every run")
    args = parser.parse_args()

    if args.collect:
        records = []
        for path in sorted(Path(args.runs).glob("*/ablation.json")):
            record = json.loads(path.read_text())
            if record["variant"] not in args.variants and args.variants != ["all"]:
                continue
            records.append(with_train_text(record, path, args))
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"records": records}, indent=1))
    elif args.report:
        records = json.loads(Path(args.report).read_text())["records"]
    else:
        jobs = [(v, s) for s in args.seeds for v in args.variants]
        with ThreadPoolExecutor(args.jobs) as pool:
            records = [r for r in pool.map(lambda job: run_one(*job, args), jobs) if r]
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(Path(args.output).read_text())["records"] if Path(args.output).is_file() else []
        keep = [r for r in previous if (r["variant"], r["seed"]) not in {(x["variant"], x["seed"]) for x in records}]
        records = keep + records
        Path(args.output).write_text(json.dumps({"records": records}, indent=1))
    rows = summarise(records)
    print(markdown(rows))
    if args.plot:
        plot(rows, args.plot)
    print(f"\nreproduce: python bench/ablation.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
