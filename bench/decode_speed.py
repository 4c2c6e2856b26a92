"""Decode speed of `NanoEBMForCausalLM.generate` on CPU: System 1, thinking (every landscape), no cache, rope.

Every variant is timed in one run, side by side: greedy decoding of `--new_tokens` characters after a
`--prompt_len`-character prompt, batch 1, through `model.generate` (which runs under no_grad). Each variant is a
separately built model with the same backbone weights (same seed); untrained weights are fine for speed, and
`energy_head.correction_scale` is set to a non-zero value so the landscapes' corrections are really computed.

Repeats are interleaved across variants (round-robin), after one short warm-up run of each, so slow drift on a
shared machine hits every variant alike; a timed run during which other processes kept more CPU cores busy than the
benchmark leaves free (read from /proc/stat) is redone (`--max_foreign_load`, `--max_retries`). Tokens/s = new
tokens / wall time of the whole `generate` call (prefill of the prompt included), median over the repeats. A logits
processor stamps every step, which gives latencies too: the first token (prefill of the prompt), the median later
token, and the slowest later token (with learned positions that is the half-window re-read past `block_size`; rope
positions slide without one).

On a small shared machine `--threads 1` gives the steadiest numbers: batch-1 decoding of this model is bound by
small ops and weight reads, so a second thread buys little, and any other busy process stalls a 2-thread run.

    python bench/decode_speed.py                      # the default 6-layer, 384-wide model
    python bench/decode_speed.py --repeats 5 --output_json decode_speed.json
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from configuration_nanoebm import NanoEBMConfig  # noqa: E402
from modeling_nanoebm import NanoEBMForCausalLM  # noqa: E402

TARGET_THINKING_VS_SYSTEM1 = 0.9  # thinking (mixture, K = 4, cached) / System 1 (cached): issue 11
TARGET_CACHED_VS_UNCACHED = 5.0  # System 1 cached / System 1 uncached


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--n_embd", type=int, default=384)
    parser.add_argument("--n_head", type=int, default=6)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--prompt_len", type=int, default=256)
    parser.add_argument("--new_tokens", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    parser.add_argument("--think_steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--correction_scale", type=float, default=0.5,
                        help="value of energy_head.correction_scale (s); non-zero so corrections are computed")
    parser.add_argument("--warmup_tokens", type=int, default=64,
                        help="new tokens of the one warm-up run per variant (it already crosses block_size when "
                             "prompt_len >= block_size, so every code path is warmed)")
    parser.add_argument("--max_foreign_load", type=float, default=0.15,
                        help="a timed run during which other processes kept more CPU cores busy (from /proc/stat) "
                             "than this plus the cores the benchmark leaves free (nproc - threads) is redone, up to "
                             "--max_retries times, and the least disturbed attempt kept; <0 disables")
    parser.add_argument("--max_retries", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=str, default=None,
                        help="text file for the prompt (default: tiny Shakespeare if found, else random ids)")
    parser.add_argument("--output_json", type=str, default=None)
    return parser.parse_args(argv)


# name, config overrides, generate kwargs (think_steps=None is filled with --think_steps)
VARIANTS = (
    ("system1_cached", dict(), dict(use_thinking=False)),
    ("thinking_linear_cached", dict(landscape="linear"), dict(use_thinking=True, think_steps=None)),
    ("thinking_mixture_cached", dict(landscape="mixture"), dict(use_thinking=True, think_steps=None)),
    ("thinking_soft_tokens_cached", dict(landscape="soft_tokens"), dict(use_thinking=True, think_steps=None)),
    # the Energy-Based Transformer's scalar energy as nanoebm's EBT recipes configure it (nanoebm/recipes.py)
    ("thinking_ebt_cached", dict(landscape="ebt", think_max_move=0.0, entropy_weight=0.0),
     dict(use_thinking=True, think_steps=None)),
    ("system1_uncached", dict(), dict(use_thinking=False, use_cache=False)),
    ("system1_rope_cached", dict(position_embedding="rope"), dict(use_thinking=False)),
)

LABELS = {
    "system1_cached": "System 1, KV cache",
    "thinking_linear_cached": "thinking K={k}, `linear`, KV cache",
    "thinking_mixture_cached": "thinking K={k}, `mixture`, KV cache",
    "thinking_soft_tokens_cached": "thinking K={k}, `soft_tokens`, KV cache",
    "thinking_ebt_cached": "thinking K={k}, `ebt` (the EBT recipes' energy), KV cache",
    "system1_uncached": "System 1, no cache (`use_cache=False`)",
    "system1_rope_cached": "System 1, KV cache, `rope` positions",
}


def find_corpus(explicit):
    from nanoebm.corpus import resolve_data_path

    return resolve_data_path(explicit)  # --data, $NANOEBM_DATA, else the embedded tiny Shakespeare


def make_prompt(args, vocab_size):
    path = find_corpus(args.data)
    if path is not None:
        text = path.read_text(encoding="utf-8")
        chars = sorted(set(text))
        if len(chars) <= vocab_size and len(text) >= args.prompt_len:
            index = {c: i for i, c in enumerate(chars)}
            ids = [index[c] for c in text[: args.prompt_len]]
            return torch.tensor([ids], dtype=torch.long), f"first {args.prompt_len} characters of {path.name}"
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab_size, (1, args.prompt_len), generator=generator)
    return ids, f"{args.prompt_len} random ids (seed {args.seed})"


def build_model(args, **overrides):
    config = NanoEBMConfig(
        vocab_size=65, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
        dropout=0.0, think_steps=args.think_steps, **overrides,
    )
    torch.manual_seed(args.seed)
    model = NanoEBMForCausalLM(config).eval()
    if hasattr(model.energy_head, "correction_scale"):
        with torch.no_grad():
            model.energy_head.correction_scale.fill_(args.correction_scale)
    return model


class StepClock(LogitsProcessor):
    """Stamps the time each decoding step reaches the logits processors (it leaves the scores alone)."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def generate_once(model, prompt, new_tokens, gen_kwargs):
    """Wall seconds of one generate call, and its latencies: (first token, each later token) in seconds."""
    clock = StepClock()
    start = time.perf_counter()
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]), **gen_kwargs,
    )
    elapsed = time.perf_counter() - start
    produced = out.shape[1] - prompt.shape[1]
    if produced != new_tokens:
        raise RuntimeError(f"generate produced {produced} tokens, expected {new_tokens}")
    stamps = [start] + clock.stamps
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return elapsed, (stamps[1] - start, steps)


def cpu_busy_seconds():
    """Busy CPU-seconds of the whole machine so far (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def timed_run(model, prompt, new_tokens, gen_kwargs):
    """generate_once's results, and the CPU cores that *other* processes kept busy meanwhile."""
    busy0, own0 = cpu_busy_seconds(), time.process_time()
    elapsed, latency = generate_once(model, prompt, new_tokens, gen_kwargs)
    busy1, own1 = cpu_busy_seconds(), time.process_time()
    foreign = None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / elapsed
    return elapsed, foreign, latency


def machine_info():
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model_name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                           if line.startswith("Model name")), platform.processor())
    except OSError:
        model_name = platform.processor()
    return dict(nproc=os.cpu_count(), cpu=model_name, torch=torch.__version__, threads=torch.get_num_threads(),
                python=platform.python_version())


def command_line(args):
    parts = ["python bench/decode_speed.py"]
    for name in ("n_layer", "n_embd", "n_head", "block_size", "prompt_len", "new_tokens", "repeats", "think_steps",
                 "threads", "warmup_tokens"):
        value = getattr(args, name)
        if value is not None:
            parts.append(f"--{name} {value}")
    if args.correction_scale != 0.5:
        parts.append(f"--correction_scale {args.correction_scale}")
    if args.max_foreign_load != 0.15:
        parts.append(f"--max_foreign_load {args.max_foreign_load}")
    if args.max_retries != 2:
        parts.append(f"--max_retries {args.max_retries}")
    if args.seed != 0:
        parts.append(f"--seed {args.seed}")
    if args.data:
        parts.append(f"--data {args.data}")
    if args.output_json:
        parts.append(f"--output_json {args.output_json}")
    return " ".join(parts)


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()  # prompt + new > block_size warns about the max length: harmless here
    prompt, prompt_source = make_prompt(args, 65)

    models = {name: build_model(args, **overrides) for name, overrides, _ in VARIANTS}
    gen_kwargs = {name: {k: (args.think_steps if k == "think_steps" else v) for k, v in kwargs.items()}
                  for name, _, kwargs in VARIANTS}

    for name in models:  # warm-up
        generate_once(models[name], prompt, min(args.warmup_tokens, args.new_tokens), gen_kwargs[name])
    times = {name: [] for name in models}
    foreign_loads = {name: [] for name in models}
    latencies = {name: [] for name in models}
    spare = max(0, (os.cpu_count() or 1) - torch.get_num_threads())  # cores the benchmark leaves to others
    redone = 0
    for r in range(args.repeats):  # interleaved, so drift hits every variant alike
        for name in models:
            attempts = []
            for attempt in range(1 + max(0, args.max_retries)):
                elapsed, foreign, latency = timed_run(models[name], prompt, args.new_tokens, gen_kwargs[name])
                attempts.append((foreign if foreign is not None else 0.0, elapsed, latency))
                note = "" if foreign is None else f" (other processes: {foreign:.2f} cores)"
                print(f"  repeat {r + 1}/{args.repeats} {name}: {args.new_tokens / elapsed:.1f} tok/s{note}",
                      file=sys.stderr)
                if foreign is None or args.max_foreign_load < 0 or foreign <= spare + args.max_foreign_load:
                    break
                if attempt == max(0, args.max_retries):
                    break
                redone += 1
                time.sleep(2.0)
            foreign, elapsed, (first, steps) = min(attempts, key=lambda a: a[:2])  # the least disturbed attempt
            times[name].append(elapsed)
            foreign_loads[name].append(foreign)
            latencies[name].append(dict(first_token_ms=1e3 * first, median_step_ms=1e3 * statistics.median(steps),
                                        slowest_step_ms=1e3 * max(steps)) if steps else
                                   dict(first_token_ms=1e3 * first, median_step_ms=None, slowest_step_ms=None))

    results = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        results[name] = dict(
            label=LABELS[name].format(k=args.think_steps), seconds=ts, median_seconds=median,
            tokens_per_s=args.new_tokens / median, min_tokens_per_s=args.new_tokens / max(ts),
            max_tokens_per_s=args.new_tokens / min(ts), foreign_load_cores=foreign_loads[name],
            latency_ms=latencies[name],
        )
        for key in ("first_token_ms", "median_step_ms", "slowest_step_ms"):
            values = [run[key] for run in latencies[name] if run[key] is not None]
            results[name][key] = statistics.median(values) if values else None
    base = results["system1_cached"]["tokens_per_s"]
    ratios = {
        "thinking_mixture / system1_cached": dict(
            value=results["thinking_mixture_cached"]["tokens_per_s"] / base, target=TARGET_THINKING_VS_SYSTEM1),
        "system1_cached / system1_uncached": dict(
            value=base / results["system1_uncached"]["tokens_per_s"], target=TARGET_CACHED_VS_UNCACHED),
    }
    for ratio in ratios.values():
        ratio["met"] = ratio["value"] >= ratio["target"]

    info = machine_info()
    config = dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, block_size=args.block_size,
                  vocab_size=65, dropout=0.0, prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch=1,
                  decoding="greedy", think_steps=args.think_steps, correction_scale=args.correction_scale,
                  repeats=args.repeats, warmup_tokens=min(args.warmup_tokens, args.new_tokens), prompt=prompt_source,
                  contention_redone_runs=redone)
    command = command_line(args)

    print(f"machine: {info['nproc']} CPUs ({info['cpu']}), torch {info['torch']}, {info['threads']} threads")
    print(f"config: {args.n_layer} layers, n_embd {args.n_embd}, n_head {args.n_head}, block_size {args.block_size}, "
          f"vocab 65, dropout 0; prompt: {prompt_source}; {args.new_tokens} new tokens, batch 1, greedy; "
          f"median of {args.repeats} (after 1 warm-up)")
    worst = max(max(v) for v in foreign_loads.values())
    print(f"other processes: {redone} timed run(s) redone for contention; the busiest kept run had {worst:.2f} "
          f"cores busy elsewhere ({spare} core(s) left free by the benchmark, allowance {args.max_foreign_load})")
    print()
    def ms(value):
        return "-" if value is None else f"{value:.1f}"

    print("| variant | tokens/s (median) | min - max | vs System 1 cached | first token ms | median step ms "
          "| slowest step ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for res in results.values():
        print(f"| {res['label']} | {res['tokens_per_s']:.1f} | {res['min_tokens_per_s']:.1f} - "
              f"{res['max_tokens_per_s']:.1f} | {res['tokens_per_s'] / base:.2f}x | {ms(res['first_token_ms'])} | "
              f"{ms(res['median_step_ms'])} | {ms(res['slowest_step_ms'])} |")
    print()
    print("| ratio | measured | target | |")
    print("|---|---:|---:|---|")
    for key, ratio in ratios.items():
        print(f"| {key} | {ratio['value']:.2f}x | >= {ratio['target']:g}x | {'met' if ratio['met'] else 'MISSED'} |")
    print()
    print(f"command: {command}")

    if args.output_json:
        payload = dict(machine=info, config=config, results=results, ratios=ratios, command=command,
                       date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        Path(args.output_json).write_text(json.dumps(payload, indent=2) + "\n")
    return results, ratios


if __name__ == "__main__":
    main()
