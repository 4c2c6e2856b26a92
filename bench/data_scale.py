#!/usr/bin/env python
"""Training on a large corpus: the old in-memory path against the prepared memory map and the stream.

    python bench/data_scale.py                                  # 100 MB and 1 GB corpora (a quiet machine, ~30 min)
    python bench/data_scale.py --sizes 5MB --processes 1 2      # a quick check that it works

Corpora are copies of the embedded tiny Shakespeare, written to --workdir (a temp folder; the prepared ids go to its
cache/). For each size it prints side by side:

* preparation: the first run on the corpus (the vocabulary pass and the ids file) and a later run (mapping it), against
  the path nanoebm had before (datasets' text loader, one Python list of ids, a tensor, and the Trainer's
  RandomSampler, which lists every window), measured by replaying that path in a child process;
* a 3-step run of run_train.py (the cpu preset; start-up, data, 3 steps, no evaluation) at 1 and 2 processes, mapped
  and streamed: its wall time and the peak resident memory of the largest process (a rank), in GB;
* the input pipeline's characters/s (a DataLoader over the mapped windows or the stream, no model) against the
  model's training characters/s (median step of run_train.py's Trainer) at the cpu and gpu presets.
Peak memory is the kernel's ru_maxrss of the largest process of each command, so the page cache a mapped file shares
between ranks counts in every rank that touched it.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TINY_RUN = ["--preset", "cpu", "--max_steps", "3", "--do_train", "true", "--do_eval", "false", "--save_strategy", "no",
            "--logging_steps", "3", "--disable_tqdm", "true", "--report_to", "none", "--overwrite_output_dir", "true",
            "--dataloader_num_workers", "0"]
# the path nanoebm had before the prepared map: replayed in a child process (time and memory of its data pipeline)
OLD_PATH = """
import sys, time, torch
sys.path.insert(0, {root!r})
from datasets import load_dataset
from tokenization_char import CharTokenizer
started = time.perf_counter()  # after the imports, as for the new path
text = "".join(load_dataset("text", data_files={path!r}, sample_by="document", split="train")["text"])
tokenizer = CharTokenizer.from_corpus(text)
ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int16)
order = iter(torch.utils.data.RandomSampler(range(int(len(ids) * 0.9) - 64)))
next(order)
print(time.perf_counter() - started)
"""


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def make_corpus(workdir: Path, size: int) -> Path:
    """`size` characters of tiny Shakespeare repeated (ASCII: as many bytes), written once, in chunks."""
    from nanoebm.corpus import EMBEDDED_CORPUS

    path = workdir / f"corpus-{size}.txt"
    if path.is_file() and path.stat().st_size == size:
        return path
    text = EMBEDDED_CORPUS.read_text(encoding="utf-8")
    with open(path, "w", encoding="utf-8") as handle:
        left = size
        while left > 0:
            handle.write(text[:left])
            left -= min(left, len(text))
    return path


def measured(command, env) -> dict:
    """Wall seconds and the peak RSS (GB) of the largest process the command ran (os.wait4's ru_maxrss)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"failed ({status}): {shlex.join(command)}\n{output[-3000:]}")
    return {"seconds": time.perf_counter() - started, "rss_gb": usage.ru_maxrss / 1e6, "output": output}


def run_command(corpus: Path, workdir: Path, processes: int, streaming: bool) -> list:
    launcher = [sys.executable, str(ROOT / "run_train.py")] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "run_train.py")]
    return [*launcher, *TINY_RUN, "--use_cpu", "true", "--data_path", str(corpus),
            "--streaming", str(streaming).lower(), "--output_dir", str(workdir / "out")]


def preparation(corpus: Path, env, old_path: bool) -> dict:
    """First run (cold cache), a later run (warm), and the old path, each in a fresh process. The old path holds
    about 50 bytes per character: past --old_path_max it would not fit in this machine's memory, and is not run."""
    build = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
             f"import run_train, tokenization_char; from nanoebm import data\n"
             f"args, started = run_train.DataArguments(data_path={str(corpus)!r}), time.perf_counter()\n"
             f"data.build_data(args, None, 64, 0); print(time.perf_counter() - started)")
    cold = measured([sys.executable, "-c", build], env)
    warm = measured([sys.executable, "-c", build], env)
    runs = [("prepare (first run)", cold), ("map (later runs)", warm)]
    if old_path:
        runs.append(("old in memory", measured([sys.executable, "-c", OLD_PATH.format(root=str(ROOT),
                                                                                       path=str(corpus))], env)))
    return {name: (float(m["output"].strip().splitlines()[-1]), m["rss_gb"]) for name, m in runs}


def pipeline_chars_per_second(corpus: Path, preset: str, streaming: bool, seconds: float = 3.0) -> float:
    """Characters/s a DataLoader delivers from the data set run_train would train on (no model)."""
    import torch

    import run_train
    from nanoebm import data

    batch, block = (run_train.PRESETS[preset][k] for k in ("per_device_train_batch_size", "block_size"))
    train, _, _ = data.build_data(run_train.DataArguments(data_path=str(corpus), streaming=streaming), None, block, 0)
    sampler = None if streaming else train.order(0)
    loader = torch.utils.data.DataLoader(train, batch_size=batch, sampler=sampler, num_workers=0)
    started, chars = time.perf_counter(), 0
    for item in loader:
        chars += item["input_ids"].numel()
        if time.perf_counter() - started > seconds:
            break
    return chars / (time.perf_counter() - started)


def model_chars_per_second(corpus: Path, preset: str, workdir: Path, steps: int) -> float:
    """Characters/s the model trains at: the median optimizer step of run_train.py's Trainer (after 2 untimed)."""
    import run_train
    from train_speed import StepTimer

    timer = StepTimer(skip=2)
    run_train.main([*TINY_RUN, "--preset", preset, "--max_steps", str(steps + 2), "--data_path", str(corpus),
                    "--output_dir", str(workdir / f"speed-{preset}")], callbacks=[timer])
    batch, block = (run_train.PRESETS[preset][k] for k in ("per_device_train_batch_size", "block_size"))
    return batch * block / statistics.median(timer.times)


def report(size, prep, runs, speeds):
    print(f"\n== corpus {size / 1e6:g} M characters ==")
    print(f"{'preparation':<24}{'seconds':>10}{'peak RSS GB':>14}{'M chars/s':>12}")
    for name, (seconds, rss) in prep.items():
        print(f"{name:<24}{seconds:>10.1f}{rss:>14.2f}{size / seconds / 1e6:>12.1f}")
    print(f"\n{'3-step run (cpu preset)':<30}{'processes':>10}{'wall s':>9}{'peak RSS GB per rank':>22}")
    for (path, processes), m in runs.items():
        print(f"{path:<30}{processes:>10}{m['seconds']:>9.1f}{m['rss_gb']:>22.2f}")
    print(f"\n{'characters/s (M)':<22}{'mapped input':>14}{'stream input':>14}{'model trains':>14}")
    for preset, (mapped, stream, model) in speeds.items():
        shown = f"{model / 1e6:>14.4f}" if model is not None else f"{'(above)':>14}"
        print(f"{preset + ' preset':<22}{mapped / 1e6:>14.2f}{stream / 1e6:>14.2f}{shown}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["100MB", "1GB"])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--presets", nargs="+", default=["cpu", "gpu"])
    parser.add_argument("--model_steps", type=int, default=5, help="timed training steps per preset (measured "
                        "once, on the first size: the model's speed does not depend on the corpus)")
    parser.add_argument("--old_path_max", default="200MB", help="largest corpus the old in-memory path is run on")
    parser.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "nanoebm-data-scale"))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.update(NANOEBM_CACHE=str(workdir / "cache"), HF_HUB_OFFLINE="1", WANDB_MODE="offline",
                      TOKENIZERS_PARALLELISM="false")
    env = dict(os.environ)
    print("reproduce: python " + shlex.join(["bench/data_scale.py", *sys.argv[1:]]))
    for n, size in enumerate(map(parse_size, args.sizes)):
        corpus = make_corpus(workdir, size)
        subprocess.run(["rm", "-rf", str(workdir / "cache")], check=True)
        prep = preparation(corpus, env, old_path=size <= parse_size(args.old_path_max))
        runs = {(("streamed" if streaming else "mapped"), n): measured(run_command(corpus, workdir, n, streaming), env)
                for streaming in (False, True) for n in args.processes}
        speeds = {preset: (pipeline_chars_per_second(corpus, preset, False),
                           pipeline_chars_per_second(corpus, preset, True),
                           model_chars_per_second(corpus, preset, workdir, args.model_steps) if n == 0 else None)
                  for preset in args.presets}
        report(size, prep, runs, speeds)
        print(json.dumps({"size": size, "preparation": prep, "speeds": speeds,
                          "runs": {f"{k[0]}-{k[1]}": {"seconds": v["seconds"], "rss_gb": v["rss_gb"]}
                                   for k, v in runs.items()}}))


if __name__ == "__main__":
    main()
