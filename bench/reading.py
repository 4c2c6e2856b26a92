#!/usr/bin/env python
"""Does learning while reading pay, and which update? Models trained by bench/thinking.py (nanoGPT's CPU config, 2000
steps), each read in order, in consecutive windows, one model at a time:

1. tuning: on the first `--tune_chars` characters of the first half of the validation split, System 1's bits/char
   with learning: on the first seed every update of the grid (rule x weights x rate), then the decay and the window
   at the best ones; on every other seed the best update of each (rule, weights) family and the overall best, as
   the first seed chose them (a grid per seed is more than this machine gives in a session);
2. report, on held-out text only (the second half of validation, and Milton's Paradise Lost, whose first
   `--milton_chars` characters are read, from ../shared/data, never committed), at the update tuning chose:
   - System 1 static, and at its best temperature (fitted on the tuning half);
   - compute-matched: System 1 static over overlapping windows (stride window / 3: three forward passes per window,
     as one forward and one backward pass cost), so every character but the first ones reads 2/3 of a window or more;
   - System 2 static (thinking), System 1 and System 2 with learning (thinking on the adapted landscape).

    python bench/thinking.py --train --variants default --seeds 0 1 2 --runs ../bench-runs/thinking
    python bench/reading.py --runs ../bench-runs/thinking --seeds 0 1 2
    python bench/reading.py --report bench/results/reading.json
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from thinking import texts  # noqa: E402

GRID = {  # (rule, weights): rates; the RMS rule's steps are in units of each weight's own gradient scale
    ("sgd", "all"): (1e-3, 3e-3, 1e-2),
    ("sgd", "head"): (1e-2, 3e-2, 1e-1, 3e-1),
    ("sgd", "norms"): (1e-2, 3e-2, 1e-1),
    ("sgd", "lora"): (1e-2, 3e-2, 1e-1, 3e-1),
    ("rms", "all"): (1e-5, 3e-5, 1e-4, 3e-4),
}
DECAYS = (0.0, 0.01)  # tried at the best rate of each rule
WINDOWS = (16, 32, 64)


def ids_of(tokenizer, text):
    import torch

    return torch.tensor(tokenizer(text)["input_ids"])


def bpc(values):
    return float(values.mean()) / math.log(2)


def score_reading_of(model, ids, setting, use_thinking=False):
    from nanoebm.scoring import score_reading

    return score_reading(model, ids, use_thinking=use_thinking, **setting)


def run_setting(model, ids, setting, rows, save=None):
    """System 1's bits/char with learning at `setting`, appended to `rows` (and saved) unless already there."""
    if any(row["setting"] == setting for row in rows):
        return
    started = time.perf_counter()
    value = bpc(score_reading_of(model, ids, setting)["nll1_adapted"])
    rows.append(dict(setting=setting, bpc=value, seconds=time.perf_counter() - started))
    print(f"    {setting}: {value:.4f} bits/char ({rows[-1]['seconds']:.0f} s)", flush=True)
    if save is not None:
        save()


def tune(model, ids, window, rows, save):
    """Every update of the grid on `ids`, then the decay at the best rate of each rule and the window at the best,
    into `rows` ({setting, bpc, seconds}; a setting already there is not run again)."""
    for (rule, weights), rates in GRID.items():
        for lr in rates:
            run_setting(model, ids, dict(adapt_rule=rule, adapt_params=weights, adapt_lr=lr, adapt_window=window),
                        rows, save)
    for rule in ("sgd", "rms"):
        top = min((row for row in rows if row["setting"]["adapt_rule"] == rule), key=lambda row: row["bpc"])
        for decay in DECAYS[1:]:
            run_setting(model, ids, {**top["setting"], "adapt_decay": decay}, rows, save)
    best = min(rows, key=lambda row: row["bpc"])["setting"]
    for w in WINDOWS:
        if w != best["adapt_window"]:
            run_setting(model, ids, {**best, "adapt_window": w}, rows, save)
    return rows


def family_bests(rows):
    """The best setting of each (rule, weights) family, and the overall best last."""
    families = {}
    for row in rows:
        key = (row["setting"]["adapt_rule"], row["setting"]["adapt_params"])
        if key not in families or row["bpc"] < families[key]["bpc"]:
            families[key] = row
    best = min(rows, key=lambda row: row["bpc"])
    return [row["setting"] for row in families.values() if row is not best] + [best["setting"]]


def overlapping_static(model, ids, window):
    """System 1 static over windows of `window` tokens every window // 3: each character scored by the window that
    gives it the most context (the first window scores all of its own). Per-character NLL (N - 1,)."""
    import torch

    from nanoebm.scoring import score_batch

    stride = max(1, window // 3)
    out = torch.empty(ids.numel() - 1)
    start = 0
    while True:
        chunk = ids[start:start + window + 1][None]
        scores = score_batch(model, chunk[:, :-1], chunk[:, 1:], use_thinking=False, trace=False)["nll1"][0].cpu()
        keep = 0 if start == 0 else window - stride
        out[start + keep:start + chunk.shape[1] - 1] = scores[keep:]
        if start + window >= ids.numel() - 1:
            return out
        start += stride


def calibrated_temperature(model, ids, window):
    """System 1's best temperature on the tuning text (consecutive windows), from nanoebm.scoring's grid."""
    from nanoebm.scoring import TEMPERATURES, score_blocks

    full = (ids.numel() - 1) // window
    scores = score_blocks(model, ids[:full * window + 1].unfold(0, window + 1, window), 64, use_thinking=False,
                          trace=False, tempered=True)
    return TEMPERATURES[int(scores["nll1_tempered"].mean((0, 1)).argmin())]


def tempered_bpc(model, ids, window, temperature):
    """System 1 at `temperature` over the consecutive windows `score_reading` reads (the last, shorter one too)."""
    import torch
    import torch.nn.functional as F

    nll = []
    for start in range(0, ids.numel() - 1, 64 * window):  # 64 windows a batch
        part = ids[start:start + 64 * window + 1]
        full = (part.numel() - 1) // window
        pieces = [part[:full * window + 1].unfold(0, window + 1, window)] if full else []
        if part.numel() - 1 > full * window:
            pieces.append(part[full * window:][None])
        for batch in pieces:
            out = model(batch[:, :-1], use_cache=False, use_thinking=False, use_adaptation=False)
            nll.append(F.cross_entropy((out.system1_logits.float() / temperature).transpose(1, 2), batch[:, 1:],
                                       reduction="none").flatten())
    return bpc(torch.cat(nll))


def report_text(model, ids, setting, temperature):
    """Every row of the report on one held-out text, in bits/char."""
    import torch

    from nanoebm.scoring import score_windows

    block = model.config.block_size  # the static rows read the longest windows the model takes: its best
    with torch.no_grad():
        reading = score_reading_of(model, ids, setting, use_thinking=True)
        static = score_windows(model, ids, block, use_thinking=True)
        return dict(
            system1=bpc(static["nll1"]), system1_calibrated=tempered_bpc(model, ids, block, temperature),
            system1_overlapping=bpc(overlapping_static(model, ids, block)), system2=bpc(static["nll2"]),
            system1_adapted=bpc(reading["nll1_adapted"]), system2_adapted=bpc(reading["nll2_adapted"]),
        )


def measure(args):
    import torch

    from modeling_nanoebm import NanoEBMForCausalLM
    from tokenization_char import CharTokenizer

    torch.set_num_threads(args.threads)
    _, val_text, milton = texts()
    half = len(val_text) // 2
    results = json.loads(Path(args.results).read_text()) if Path(args.results).is_file() else {}
    chosen = None

    def save():
        Path(args.results).write_text(json.dumps(results, indent=1))

    for seed in args.seeds:
        key = f"{args.variant}-s{seed}"
        entry = results.setdefault(key, {"tuning": []})  # (a "cost" entry beside the runs: --cost)
        if "milton" in entry and not args.force:
            chosen = chosen or entry["chosen"]
            continue
        folder = Path(args.runs) / key
        model = NanoEBMForCausalLM.from_pretrained(folder).eval()
        tokenizer = CharTokenizer.from_pretrained(folder)
        tuning = ids_of(tokenizer, val_text[:half][:args.tune_chars])
        print(f"[{key}] tuning on {tuning.numel()} characters", flush=True)
        rows = entry["tuning"]
        with torch.no_grad():
            if chosen is None:
                tune(model, tuning, model.config.block_size, rows, save)
            else:
                for setting in family_bests(results[f"{args.variant}-s{args.seeds[0]}"]["tuning"]):
                    run_setting(model, tuning, setting, rows, save)
            temperature = calibrated_temperature(model, ids_of(tokenizer, val_text[:half]), model.config.block_size)
        chosen = chosen or min(rows, key=lambda row: row["bpc"])["setting"]
        print(f"[{key}] reporting {chosen}; System 1's temperature {temperature:.3f}", flush=True)
        held, other = ids_of(tokenizer, val_text[half:]), ids_of(tokenizer, milton[:args.milton_chars])
        entry.update(chosen=chosen, temperature=temperature, validation=report_text(model, held, chosen, temperature),
                     milton=report_text(model, other, chosen, temperature))
        save()
        print_report({k: v for k, v in results.items() if "milton" in v})
    print(f"\nreproduce: python bench/reading.py {' '.join(sys.argv[1:])}")


def measure_cost(args):
    """Reading speed, characters per second, of System 1 static (consecutive windows, batched) and with learning
    (one window at a time: a forward and a backward pass each), interleaved and repeated, one model, one thread."""
    import torch

    from modeling_nanoebm import NanoEBMForCausalLM
    from nanoebm.scoring import score_windows
    from tokenization_char import CharTokenizer

    torch.set_num_threads(args.threads)
    _, val_text, _ = texts()
    results = json.loads(Path(args.results).read_text())
    folder = Path(args.runs) / f"{args.variant}-s{args.seeds[0]}"
    model = NanoEBMForCausalLM.from_pretrained(folder).eval()
    ids = ids_of(CharTokenizer.from_pretrained(folder), val_text[len(val_text) // 2:][:args.cost_chars])
    chosen = results[f"{args.variant}-s{args.seeds[0]}"]["chosen"]
    timings = {"static": [], "learning": []}
    for _ in range(args.repeats):
        for name in timings:
            started = time.perf_counter()
            with torch.no_grad():
                if name == "static":
                    score_windows(model, ids, model.config.block_size, use_thinking=False)
                else:
                    model(ids[None], use_adaptation=True, use_thinking=False, return_energy_trace=False, **chosen)
            timings[name].append(ids.numel() / (time.perf_counter() - started))
    results["cost"] = dict(chars=ids.numel(), threads=args.threads, repeats=args.repeats, setting=chosen,
                           chars_per_s={k: statistics.median(v) for k, v in timings.items()},
                           spread={k: [min(v), max(v)] for k, v in timings.items()})
    Path(args.results).write_text(json.dumps(results, indent=1))
    print_cost(results["cost"])


def print_cost(cost):
    static, learning = cost["chars_per_s"]["static"], cost["chars_per_s"]["learning"]
    print(f"\nreading cost ({cost['chars']} characters, {cost['threads']} thread(s), median of {cost['repeats']} "
          f"interleaved repeats): System 1 static {static:.0f} chars/s, learning while reading {learning:.0f} chars/s "
          f"({static / learning:.1f}x the time)")


ROWS = (("system1", "System 1, static"), ("system1_calibrated", "System 1 at its best temperature (fitted on tuning)"),
        ("system1_overlapping", "System 1, overlapping windows (compute-matched: 3 passes per window)"),
        ("system2", "System 2 (thinking), static"), ("system1_adapted", "System 1, learning while reading"),
        ("system2_adapted", "System 2, learning while reading"))


def print_report(results):
    runs = sorted(results)
    print(f"\nreported at the update chosen on {runs[0]}'s tuning text: {results[runs[0]]['chosen']}")
    for text in ("validation", "milton"):
        print(f"\n{text} (held out), bits/char, mean ± std over {len(runs)} run(s), and against calibrated System 1:")
        print("| | bits/char | vs calibrated System 1 |\n|---|---:|---:|")
        for name, label in ROWS:
            values = [results[r][text][name] for r in runs]
            gains = [100 * (results[r][text][name] / results[r][text]["system1_calibrated"] - 1) for r in runs]
            print(f"| {label} | {statistics.mean(values):.4f}{spread(values)} | "
                  f"{statistics.mean(gains):+.2f}%{spread(gains)} |")
    print("\ntuning text, System 1 with learning, bits/char per run (- not run on that seed):")
    print("| update | " + " | ".join(runs) + " |\n|---|" + "---:|" * len(runs))
    for row in results[runs[0]]["tuning"]:
        cells = []
        for run in runs:
            match = [other["bpc"] for other in results[run]["tuning"] if other["setting"] == row["setting"]]
            cells.append(f"{match[0]:.4f}" if match else "-")
        print(f"| {describe(row['setting'])} | " + " | ".join(cells) + " |")


def spread(values):
    return f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""


def describe(setting):
    decay = f", decay {setting['adapt_decay']:g}" if setting.get("adapt_decay") else ""
    return (f"{setting['adapt_rule']} {setting['adapt_params']} lr {setting['adapt_lr']:g}{decay}, window "
            f"{setting['adapt_window']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=str(ROOT.parent / "bench-runs" / "thinking"))
    parser.add_argument("--variant", default="default", help="which bench/thinking.py variant's runs to read")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tune_chars", type=int, default=30_000)
    parser.add_argument("--milton_chars", type=int, default=60_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "reading.json"))
    parser.add_argument("--force", action="store_true", help="measure runs already in the results file again")
    parser.add_argument("--report", help="print the tables of a saved results file")
    parser.add_argument("--cost", action="store_true", help="time reading with and without learning instead")
    parser.add_argument("--cost_chars", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.report:
        results = json.loads(Path(args.report).read_text())
        print_report({k: v for k, v in results.items() if k != "cost"})
        if "cost" in results:
            print_cost(results["cost"])
        return
    if args.cost:
        measure_cost(args)
        print(f"\nreproduce: python bench/reading.py {' '.join(sys.argv[1:])}")
        return
    measure(args)


if __name__ == "__main__":
    main()
