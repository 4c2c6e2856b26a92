"""run_generate.py --compare: validation bits per character of System 1 and System 2, the energy gap thinking buys
and decode speed for one loaded model, and the Markdown table of several. torch is imported inside the functions.
"""

from __future__ import annotations

import time
from pathlib import Path

from nanoebm.analysis import encode, note, resolved_thinking, scoring_adapt_flags
from nanoebm.card import read_record
from nanoebm.cli import UsageError, flag_value
from nanoebm.corpus import fixed_blocks, load_bpc_metric, resolve_data_path, validation_text
from nanoebm.generate_args import check_learning, read_prompt
from nanoebm.generating import load_model, resolve_device, write_json
from nanoebm.page import comparison_page, comparison_section, log_page
from nanoebm.plots import make_folder, plot_comparison
from nanoebm.scoring import calibrated_on_even_blocks, score_blocks, score_reading


def evaluate_model(model, tokenizer, val: str, prompt: str, args, device, label: str) -> dict:
    """One row of the comparison: bits per character of System 1 and System 2 on args.eval_blocks fixed blocks of
    the validation text `val`, the mean energy gap J0 - JK, and greedy decode tokens/s of both systems continuing
    `prompt` for args.max_new_tokens characters (think_steps / think_lr from args where given)."""
    import torch

    ids = torch.tensor(encode(tokenizer, val, f"the validation text (for {label})"))
    block = model.config.block_size
    try:
        blocks = fixed_blocks(ids, block, args.eval_blocks)
    except ValueError as error:
        raise UsageError(str(error)) from error
    scores = score_blocks(model, blocks, 8, think_steps=args.think_steps, think_lr=args.think_lr, tempered=True)
    metric = load_bpc_metric()
    s1 = metric.compute(nll=scores["nll1"].flatten().cpu().numpy())
    s2 = metric.compute(nll=scores["nll2"].flatten().cpu().numpy())
    trace = scores["trace"]
    speed = decode_speed(model, tokenizer, prompt, args, device)
    thinking = resolved_thinking(model, args)
    return dict(
        model=label, landscape=model.config.landscape, block_size=block,
        think_steps=thinking["think_steps"], think_lr=thinking["think_lr"],
        parameters=sum(p.numel() for p in model.parameters()),
        bpc_system1=s1["bits_per_char"], bpc_system2=s2["bits_per_char"], n_chars=s1["n_chars"],
        **calibration_columns(scores), **reading_columns(model, tokenizer, val, args),
        energy_gap=float((trace[..., 0] - trace[..., -1]).mean()) if trace is not None else None,
        tokens_per_s_system1=speed["system1"], tokens_per_s_system2=speed["system2"],
    )


def calibration_columns(scores) -> dict:
    """System 1 at a temperature fitted on the even-numbered blocks, and System 2, both in bits per character on the
    odd-numbered ones (as training's evaluation does): temperature_system1, bpc_system1_calibrated,
    bpc_system2_heldout; None with a single block."""
    import math

    result = calibrated_on_even_blocks(scores)
    if result is None:
        return dict(temperature_system1=None, bpc_system1_calibrated=None, bpc_system2_heldout=None)
    return dict(temperature_system1=result["temperature"],
                bpc_system1_calibrated=result["system1_calibrated"] / math.log(2),
                bpc_system2_heldout=result["system2"] / math.log(2))



def reading_columns(model, tokenizer, val: str, args) -> dict:
    """Bits per character of the first args.reading_chars characters of `val` read in order, in consecutive windows:
    System 1 and System 2 static and with learning while reading (the model's adapt_* settings, or the flags given),
    on the same characters (`score_reading`, one pass in reading order). None where it is skipped (reading_chars 0,
    or a folder whose model code predates learning while reading)."""
    import math

    import torch

    names = ("bpc_system1_static_reading", "bpc_system2_static_reading", "bpc_system1_adapted", "bpc_system2_adapted")
    if args.reading_chars <= 0 or not hasattr(model.config, "adapt_lr"):
        return dict.fromkeys(names + ("reading_chars",))
    text = val[:args.reading_chars]
    ids = torch.tensor(encode(tokenizer, text, "the validation text"))
    adapt = scoring_adapt_flags(args)
    scores = score_reading(model, ids, think_steps=args.think_steps, think_lr=args.think_lr, **adapt)
    values = [float(scores[k].mean()) / math.log(2) for k in ("nll1_static", "nll2_static", "nll1_adapted",
                                                               "nll2_adapted")]
    return dict(zip(names, values), reading_chars=len(text))


def decode_speed(model, tokenizer, prompt: str, args, device) -> dict:
    """Greedy decode tokens/s of System 1 and System 2 continuing `prompt` for args.max_new_tokens characters, after
    a two-token warm-up."""
    import torch

    prompt_ids = torch.tensor([encode(tokenizer, prompt)], device=device)
    speed = {}
    for name, use_thinking in (("system1", False), ("system2", True)):
        kw = dict(do_sample=False, use_thinking=use_thinking, think_steps=args.think_steps, think_lr=args.think_lr)
        kw = {k: v for k, v in kw.items() if v is not None}
        with torch.no_grad():
            model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=2, **kw)  # warm-up
            started = time.perf_counter()
            out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                 max_new_tokens=args.max_new_tokens, **kw)
            out.cpu()
        speed[name] = args.max_new_tokens / max(time.perf_counter() - started, 1e-9)
    return speed


def training_text(folder, corpus: Path) -> dict:
    """What the model in `folder` trained on, from its run record (every run of its lineage), and whether that is
    `corpus`, the text --compare scores it on: trained_on (a label) and on_this_text (True, False, or None when the
    record cannot say: no record, or a recorded path that does not exist here)."""
    record = read_record(folder)
    if record is None:
        return dict(trained_on="unknown (no nanoebm_run.json)", on_this_text=None)
    labels, verdicts = [], []
    for run in record["runs"]:
        given = recorded_data(run)
        if given is None:
            label, same = "unknown (no command recorded)", None
        elif given[0] is not None:
            label, same = f"data set {given[0]}", False
        else:
            path = given[1]
            label = path if path is not None else "the default corpus ($NANOEBM_DATA or the tiny Shakespeare)"
            same = same_file(path, corpus)
        if label not in labels:
            labels.append(label)
        verdicts.append(same)
    on_this_text = False if False in verdicts else None if None in verdicts else True
    return dict(trained_on=" then ".join(labels), on_this_text=on_this_text)


def recorded_data(run: dict):
    """(dataset_name, data_path) a recorded run trained on: from its settings, or from the command line a record
    without them kept; None when it recorded neither."""
    settings = run.get("settings")
    if isinstance(settings, dict):
        return tuple(settings.get(name, {}).get("value") for name in ("dataset_name", "data_path"))
    argv = run.get("argv")
    if not isinstance(argv, list):
        return None
    return flag_value(argv, "dataset_name"), flag_value(argv, "data_path")


def same_file(recorded, corpus: Path):
    """Whether a recorded --data_path (None: the default, resolved here as it was at training) is `corpus`; None
    when the recorded file is not here (a relative path was relative to where training ran)."""
    try:
        found = resolve_data_path(recorded) if recorded is not None else resolve_data_path()
    except FileNotFoundError:
        return None
    return found.resolve() == corpus.resolve()


def comparison_table(rows: list[dict]) -> str:
    """The rows of evaluate_model as a Markdown table. "S2 - calibrated S1" is measured on the odd-numbered blocks,
    System 1's temperature T fitted on the even-numbered ones: thinking that only recalibrates System 1 shows about
    0 there."""
    header = ("| model | trained on | landscape | think steps | bpc System 1 | bpc System 2 | S2 - S1 "
              "| S2 - calibrated S1 (T) | reading: S1 static, learning | S2 static, learning | energy gap J0-JK "
              "| tok/s System 1 | tok/s System 2 |")
    lines = [header, "|" + "---|" * 13]
    for r in rows:
        gap = f"{r['energy_gap']:.4g}" if r["energy_gap"] is not None else "-"
        calibrated = "-" if r["bpc_system1_calibrated"] is None else (
            f"{r['bpc_system2_heldout'] - r['bpc_system1_calibrated']:+.4f} ({r['temperature_system1']:.2f})")
        trained = {True: "this text", False: f"other: {r['trained_on']}", None: f"? {r['trained_on']}"}
        reading = ["-", "-"] if r.get("bpc_system1_adapted") is None else [
            f"{r[f'bpc_system{k}_static_reading']:.4f}, {r[f'bpc_system{k}_adapted']:.4f}" for k in (1, 2)]
        lines.append(
            f"| {r['model']} | {trained[r['on_this_text']]} | {r['landscape']} | {r['think_steps']} "
            f"| {r['bpc_system1']:.4f} | {r['bpc_system2']:.4f} | {r['bpc_system2'] - r['bpc_system1']:+.4f} "
            f"| {calibrated} | {reading[0]} | {reading[1]} | {gap} | {r['tokens_per_s_system1']:.1f} "
            f"| {r['tokens_per_s_system2']:.1f} |"
        )
    return "\n".join(lines)


def run_compare(args, command: str) -> int:
    """Compare mode: score every model on the one validation text, print the table, draw and write it (and the
    page, with one section per model; `command` is the command line, which the page shows)."""
    device = resolve_device(args.device)
    try:
        corpus = resolve_data_path(args.data_path)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from error
    val = validation_text(corpus.read_text(encoding="utf-8"))
    prompt = read_prompt(args) or "\n"  # read once: a --prompt_file - (stdin) serves every model
    names = [Path(p).name or str(p) for p in args.compare]
    labels = [n if names.count(n) == 1 else str(p) for n, p in zip(names, args.compare, strict=True)]
    note(f"validation: last 10% of {corpus} ({len(val)} characters), {args.eval_blocks} blocks per model; decode "
         f"speed over {args.max_new_tokens} characters, greedy, on {device}")
    rows, sections = [], []
    for path, label in zip(args.compare, labels, strict=True):
        model, tokenizer = load_model(path, device, args.unk_token, args.dtype)
        check_learning(args, model, repr(str(path)))
        row = evaluate_model(model, tokenizer, val, prompt, args, device, label)
        row.update(path=str(path), **training_text(path, corpus))
        rows.append(row)
        if args.html:
            sections.append(comparison_section(model, tokenizer, val, args, row))
        note(f"{label}: System 1 {row['bpc_system1']:.4f}, System 2 {row['bpc_system2']:.4f} bits/char")
    warn_other_texts(rows, corpus)
    print(comparison_table(rows), flush=True)
    if args.plot or args.output_dir:
        note(f"wrote {plot_comparison(rows, make_folder(Path(args.plot or args.output_dir)) / 'compare.png')}")
    else:
        note("no bar chart: give --plot DIR or --output_dir DIR")
    if args.output_json or args.output_dir:
        write_json(dict(data=str(corpus), eval_blocks=args.eval_blocks, max_new_tokens=args.max_new_tokens,
                        device=str(device), models=rows),
                   Path(args.output_json) if args.output_json else Path(args.output_dir) / "compare.json")
    if args.html:
        page = comparison_page(sections, val, args, command)
        if args.report_to == "wandb":
            log_page(page, command)
    return 0


def warn_other_texts(rows: list[dict], corpus: Path) -> None:
    """A warning for each model trained on another text than the one scored (or on one its record cannot name)."""
    for row in rows:
        if row["on_this_text"] is not True:
            why = "not on this text" if row["on_this_text"] is False else "which its record cannot tie to this text"
            note(f"warning: {row['model']} trained on {row['trained_on']}, {why}: its bits/char measure how it does "
                 f"on {corpus.name}, not on the text it learned")
