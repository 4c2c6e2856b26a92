"""What a training run was, kept with what it made: the run record (nanoebm_run.json), the model card, the summary.

A model folder and every checkpoint carry `nanoebm_run.json`: the run's command as launched (accelerate included),
processes, batch, steps and seed, every setting with where it came from, and the runs it continued (its lineage).
Continuing or resuming reads it, so a continued run keeps the batch it continues, a resume repeats the run's settings,
and the card shows every run that made the weights. `describe_run` makes it before training, `write_results` writes
it with the card once the model is saved.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from nanoebm.cli import UsageError

if TYPE_CHECKING:
    from nanoebm.arguments import ParsedArguments

RUN_RECORD = "nanoebm_run.json"


def read_record(folder) -> dict | None:
    """The run record in a model or checkpoint folder, or None when it has none or none that reads as one."""
    path = Path(folder) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("runs"), list) and record["runs"] else None


def launch_command(argv, world_size: int) -> str:
    """The command a person would type to repeat this run: `accelerate launch` (with its process count) when the
    process was started by accelerate, else `python`."""
    script = "run_train.py"
    launched_by_accelerate = any(k.startswith("ACCELERATE_") for k in os.environ) or world_size > 1
    if launched_by_accelerate:
        launcher = "accelerate launch" + (f" --num_processes {world_size}" if world_size > 1 else "")
    else:
        launcher = "python"
    return " ".join([launcher, script, *(shlex.quote(str(a)) for a in argv)])


def new_run(*, command, preset, processes, per_device_batch, accumulation, block_size, max_steps, seed, output_dir,
            started_from) -> dict:
    return dict(
        command=command, preset=preset, processes=processes, per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation, global_batch=per_device_batch * accumulation * processes,
        block_size=block_size, max_steps=max_steps, steps_done=0, seed=seed, output_dir=str(output_dir),
        started_from=started_from, started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        python=sys.version.split()[0], versions=_versions(),
    )


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "accelerate", "datasets"):
        with contextlib.suppress(PackageNotFoundError):  # a package not installed is left out
            found[name] = version(name)
    return found


def lineage_from(model_folder=None, checkpoint=None) -> list[dict]:
    """The runs that made the starting weights: the saved folder's lineage, or the interrupted run of a checkpoint."""
    if checkpoint is not None:
        record = read_record(checkpoint)
        if record is None:
            return [dict(command="unknown (checkpoint written before nanoebm kept run records)",
                         output_dir=str(checkpoint), status="interrupted")]
        runs = [dict(run) for run in record["runs"]]
        step = runs[-1].get("steps_done", "?")
        runs[-1]["status"] = f"up to its checkpoint of step {step}, which the next run resumes"
        return runs
    if model_folder is not None:
        record = read_record(model_folder)
        if record is None:
            return [dict(command="unknown (folder saved before nanoebm kept run records)",
                         output_dir=str(model_folder))]
        return [dict(run) for run in record["runs"]]
    return []


def run_steps(runs: list[dict], i: int) -> int:
    """The optimizer steps run i did itself: a resumed run's global step counts those of the run it resumes too."""
    run = runs[i]
    start = run.get("started_at_step")
    if start is None:  # a record without it: a resume starts where the run before it stopped
        resumed = isinstance(run.get("started_from"), dict) and "checkpoint" in run["started_from"]
        start = runs[i - 1].get("steps_done", 0) if resumed and i > 0 else 0
    return run.get("steps_done", 0) - start


def total_steps(runs: list[dict]) -> int:
    """The optimizer steps that made the weights: every run's own, oldest first."""
    return sum(run_steps(runs, i) for i in range(len(runs)))


def suggested_prompt(opening: str, longest: int = 24) -> str:
    """A prompt the model can encode: the first line of `opening` (the start of its training text as the model
    reads it) that holds more than spaces, cut at a word boundary to at most `longest` characters."""
    for line in opening.splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= longest else line[:longest].rsplit(" ", 1)[0] or line[:longest]
    return opening[:longest]


def _fmt(metrics, key):
    return f"{metrics[key]:.4f}" if isinstance(metrics, dict) and key in metrics else "n/a"


def system1_label(config) -> str:
    """System 1 is the per-token head's one-pass prediction; it is where thinking starts only with
    think_init="base_energy" (the EBT paper's recipes start from random or zero logits, and may not train it)."""
    if config.think_init == "base_energy":
        return "System 1"
    start = {"zeros": "zero", "random": "random"}.get(config.think_init, config.think_init)
    return f"System 1 (per-token head; thinking starts from {start} logits)"


def model_card(folder, runs: list[dict], metrics: dict, config, prompt: str) -> str:
    """README.md of a trained model folder: what it is, its numbers, how to use it (from `prompt`, text it can
    encode), every run that made it."""
    folder = str(folder)
    steps = config.think_steps
    return f"""---
library_name: transformers
tags: [nanoebm, energy-based-model, character-level]
---
# nanoebm model

An energy-based character transformer that thinks at decode time ({config.n_layer} layers, {config.n_embd} wide,
block {config.block_size}, landscape `{config.landscape}`, {steps} thinking steps).

| validation | bits per char | nats per char |
|---|---|---|
| {system1_label(config)} | {_fmt(metrics, 'eval_system1_bpc')} | {_fmt(metrics, 'eval_system1_loss')} |
| System 2 ({steps} steps) | {_fmt(metrics, 'eval_system2_bpc')} | {_fmt(metrics, 'eval_system2_loss')} |
| System 2 ({2 * steps} steps) | {_fmt(metrics, 'eval_system2_2x_bpc')} | {_fmt(metrics, 'eval_system2_2x_loss')} |

Energy gap J0 - JK: {_fmt(metrics, 'eval_energy_gap')}.

## Use it

```bash
python run_generate.py --model_name_or_path {shlex.quote(folder)} --prompt {shlex.quote(prompt)} --max_new_tokens 200
```

```python
from transformers import pipeline
generator = pipeline("text-generation", model={folder!r}, trust_remote_code=True)
generator({prompt!r}, think_steps={steps}, max_new_tokens=200, do_sample=True, top_k=64)
```

## How it was trained

{total_steps(runs)} optimizer steps in all, by every run that made these weights, oldest first (batch: processes x
per-device batch x accumulation = blocks per optimizer step; steps: the run's own; details in `nanoebm_run.json`):

| run | command | batch | steps | seed | System 1 bits/char | System 2 bits/char | |
|---|---|---|---|---|---|---|---|
{_runs_table(runs)}
"""


def _runs_table(runs: list[dict]) -> str:
    """The model card's rows, one per run, oldest first; what a record lacks is n/a."""
    rows = []
    for i, run in enumerate(runs):
        batch = (f"{run['processes']} x {run['per_device_train_batch_size']} x {run['gradient_accumulation_steps']} = "
                 f"{run['global_batch']}" if "global_batch" in run else "n/a")
        own = run_steps(runs, i) if "steps_done" in run else "n/a"
        rows.append(f"| {i + 1} | `{run.get('command', 'n/a')}` | {batch} | {own} | "
                    f"{run.get('seed', 'n/a')} | {_fmt(run.get('metrics'), 'eval_system1_bpc')} | "
                    f"{_fmt(run.get('metrics'), 'eval_system2_bpc')} | {run.get('status', 'finished')} |")
    return "\n".join(rows)


def summary(folder, runs: list[dict], metrics: dict, config, seconds: float, checkpoints: str, prompt: str) -> str:
    """The lines a finished run (the last of `runs`) ends on: where the model is, its numbers, the command that
    generates from it (from `prompt`, text it can encode)."""
    folder, run = str(folder), runs[-1]
    s1, s2 = _fmt(metrics, "eval_system1_bpc"), _fmt(metrics, "eval_system2_bpc")
    minutes, secs = divmod(int(seconds), 60)
    own, total = run_steps(runs, len(runs) - 1), total_steps(runs)
    before = f"; the model has {total} in all, with the runs it continues" if total != own else ""
    return "\n".join([
        f"nanoebm: trained {own} steps in {minutes}m{secs:02d}s "
        f"({run['processes']} process(es), {run['global_batch']} blocks of {config.block_size} characters per step)"
        + before,
        f"  model:       {folder}/ (weights, config, tokenizer, model card README.md, {RUN_RECORD})",
        f"  validation:  {system1_label(config)} {s1} bits/char, System 2 {s2} bits/char "
        f"({config.think_steps} thinking steps)",
        f"  checkpoints: {checkpoints}",
        f"  generate:    python run_generate.py --model_name_or_path {shlex.quote(folder)} "
        f"--prompt {shlex.quote(prompt)}",
    ])


def json_file(path):
    """A JSON file's contents, or a UsageError that says it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UsageError(f"{path} is missing or not valid JSON ({error})") from None


def describe_run(args: ParsedArguments, model, T, settings: dict) -> dict:
    """The run record ({"runs": [...]}, this run last): the lineage of the starting weights, then this run, with
    `settings` (settings.run_settings: every setting with where it came from)."""
    folder = args.start.model_name_or_path
    started_from = ({"checkpoint": str(args.resume_from)} if args.resume_from else
                    {"model": folder} if folder else "random init")
    runs = lineage_from(folder if not args.resume_from else None, args.resume_from)
    run = new_run(command=launch_command(args.argv, T.world_size), preset=args.preset, processes=T.world_size,
                  per_device_batch=T.per_device_train_batch_size, accumulation=T.gradient_accumulation_steps,
                  block_size=model.config.block_size, max_steps=T.max_steps, seed=T.seed, output_dir=T.output_dir,
                  started_from=started_from)
    # a resumed run's global step counts the steps of the run it resumes: this run's own start from there
    run["started_at_step"] = json_file(args.resume_from / "trainer_state.json").get("global_step", 0) \
        if args.resume_from else 0
    run["argv"] = args.argv
    # every setting with where it came from; a resume of this run repeats them
    run["settings"] = settings
    return {"runs": [*runs, run]}


def write_results(trainer, work_dir: Path, final_dir: Path, record: dict, metrics: dict, prompt: str):
    """The run record (finished: its steps and evaluation), the model card and the metrics beside the model saved in
    `work_dir`, which becomes `final_dir` (folders.finish_folder). `prompt`: what the card suggests generating from
    (text the model can encode)."""
    run = record["runs"][-1]
    evaluation = {k: v for k, v in metrics.items() if k.startswith("eval_")}
    run.update(steps_done=trainer.state.global_step, metrics=evaluation, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    (work_dir / RUN_RECORD).write_text(json.dumps(record, indent=1))
    (work_dir / "README.md").write_text(model_card(final_dir, record["runs"], metrics, trainer.model.config, prompt))
    (work_dir / "all_results.json").write_text(json.dumps(metrics, indent=2))
    (work_dir / "training_args.bin").unlink(missing_ok=True)  # the record says it in JSON


def opening_text(train_data, eval_blocks, tokenizer, n=200) -> str:
    """The first characters of the training text as the model reads them (a streamed corpus: of its validation
    part, which is the stream's start), so every one of them is a character the model can encode."""
    from nanoebm.data import RandomOffsetBlocks

    ids = train_data.ids[:n] if isinstance(train_data, RandomOffsetBlocks) else eval_blocks[0][:n]
    return tokenizer.decode(ids.tolist())
