#!/usr/bin/env python
"""The README's picture: bits per character against calibrated System 1 (System 1 at its best temperature), mean and
std over seeds, paired by seed, on held-out validation text and on Milton's Paradise Lost, from the recorded results
(no model is run):

    python bench/numbers_plot.py                      # writes docs/numbers.png

Learning while reading and its compute-matched static baseline come from bench/results/reading.json (bench/reading.py:
text read in order, in windows of 64 characters); thinking on each landscape from
bench/results/thinking_calibration.json (bench/thinking.py --calibration_only: 500 blocks of 64 characters). The two
protocols score different blocks of the same texts; BENCHMARKS.md has both.
"""

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
THINKING = {"default": "thinking: mixture (default)", "soft_tokens": "thinking: soft tokens",
            "ebt_hybrid": "thinking: EBT energy (ebt_hybrid)"}
READING = {"system1_overlapping": "System 1, compute-matched context", "system1_adapted": "learning while reading"}
TEXTS = ("validation", "milton")


def change(scores, key):
    """100 * (score / calibrated System 1 - 1), per seed."""
    return 100 * (scores[key] / scores["system1_calibrated"] - 1)


def rows():
    """[(label, {text: (mean, std)})] in the order drawn."""
    found = []
    records = json.loads((RESULTS / "thinking_calibration.json").read_text(encoding="utf-8"))
    for variant, label in THINKING.items():
        runs = [r["calibration"] for r in records if r["variant"] == variant and "calibration" in r]
        found.append((label, {text: [change(run[text], "system2") for run in runs] for text in TEXTS}))
    reading = json.loads((RESULTS / "reading.json").read_text(encoding="utf-8"))
    seeds = [record for name, record in reading.items() if name != "cost"]
    for key, label in READING.items():
        found.append((label, {text: [change(seed[text], key) for seed in seeds] for text in TEXTS}))
    return [(label, {text: (statistics.mean(v), statistics.stdev(v)) for text, v in cells.items()})
            for label, cells in found]


def plot(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = rows()
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=120)
    height = 0.38
    for i, (text, colour) in enumerate(zip(TEXTS, ("tab:blue", "tab:orange"))):
        ys = [n + (i - 0.5) * height for n in range(len(data))]
        means = [cells[text][0] for _, cells in data]
        stds = [cells[text][1] for _, cells in data]
        ax.barh(ys, means, height, xerr=stds, color=colour, capsize=3,
                label="held-out Shakespeare" if text == "validation" else "Milton (out of distribution)")
    ax.set_yticks(range(len(data)), [label for label, _ in data])
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("bits/char against calibrated System 1 (%), lower is better")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    for label, cells in data:
        print(f"{label:40s} " + "  ".join(f"{text} {m:+.2f}% ± {s:.2f}" for text, (m, s) in cells.items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plot", default=str(ROOT / "docs" / "numbers.png"), help="where to write the picture")
    plot(parser.parse_args().plot)
