"""run_generate.py --html: one self-contained page per run that shows, character by character, what thinking did
(System 2 against System 1, step by step) and what learning while reading gained.

The page is a template (nanoebm/templates/page.html: its script and style inline) with the numbers computed here
written into it as JSON: no server, no network, no model in the page. Everything the page can show is computed once
here, so its thinking-steps slider only re-reads per-step numbers: every step's top-k candidates, the probability of
the character, KL(step k || System 1) and J at every step. Probabilities are kept to 1e-4, J to seven significant
digits (the page subtracts them) and the rest to four, so that 2,000 characters stay well under 2 MB.

Importing it costs no torch (imported where used).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from nanoebm.analysis import (encode, note, resolved_thinking, score_continuations, scoring_adapt_flags,
                              token_strings)
from nanoebm.cli import UsageError
from nanoebm.scoring import TEMPERATURES, calibrated_system1, score_reading

TEMPLATE = Path(__file__).parent / "templates" / "page.html"
PAGE_STEPS = 8  # the thinking steps a page scores when the run itself does not think (the slider's range)
HTML_CHARS = 2000  # --html_chars: the characters whose details a page holds (about 0.5 KB each)
TOP = 5  # candidates kept per system and step: the bars


def check_html_path(value: str) -> None:
    """--html must name a file in a folder that exists and can be written: checked before anything runs, so that a
    refused command writes nothing (not even the other outputs asked for)."""
    path = Path(value).expanduser()
    folder = path.parent
    if path.is_dir():
        raise UsageError(f"--html {value!r} is a folder: give a file name in it, e.g. {path / 'page.html'}")
    if not folder.exists():
        raise UsageError(f"--html {value!r}: the folder {str(folder)!r} does not exist (create it, or give another)")
    if not folder.is_dir():
        raise UsageError(f"--html {value!r}: {str(folder)!r} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"--html {value!r}: {str(folder)!r} cannot be written here (give a writable folder)")


def page_steps(thinking: dict) -> tuple[int, str]:
    """K, the thinking steps the page scores, and how the header says where K comes from: the run's own steps when it
    thinks, else PAGE_STEPS, so that a System 1 run still shows what thinking would have done."""
    if thinking["use_thinking"] and thinking["think_steps"] > 0:
        return thinking["think_steps"], f"{thinking['think_steps']} (the run's)"
    return PAGE_STEPS, f"{PAGE_STEPS} (scored for this page only: the run decoded with System 1)"


def model_section(model, tokenizer, ids, label: str, thinking: dict, args, learn: bool, header: list) -> dict:
    """One model's numbers for the characters ids[1:] (ids: 1-D, at most --html_chars + 1 long; the first is read,
    never predicted): per character and per thinking step k = 0..K (0: System 1) its probability, KL(step k ||
    System 1), J and the top candidates, the window it was read in, and with `learn` what learning while reading
    gained (`reading`). `header`: (name, value) pairs shown above the text."""
    import torch

    steps, steps_note = page_steps(thinking)
    scores = score_continuations(model, ids[None].to(model.device), 1, steps, thinking["think_lr"], steps=True)
    logp = torch.cat([scores["logp1"][0, :, None], scores["logp_steps"][0]], 1)  # (n, K + 1, V); step 0: System 1
    target = scores["targets"][0]
    chosen = logp.gather(-1, target[:, None, None].expand(-1, steps + 1, 1))[..., 0]
    kl = (logp.exp() * (logp - logp[:, :1])).sum(-1).clamp(min=0)
    top_p, top_i = logp.exp().topk(min(TOP, logp.shape[-1]), -1)
    bpc = bits_per_char(scores["logp1"][0], target, -chosen[:, -1])
    section = dict(
        label=label, steps=steps, chars=token_strings(tokenizer, ids.tolist()), targets=target.tolist(),
        vocab=token_strings(tokenizer, range(model.config.vocab_size)), ctx=scores["window_start"].tolist(),
        p=_probabilities(chosen.exp()), kl=_rounded(kl), J=_rounded(scores["trace"][0], 7),  # J0 - Jk: small
        top=torch.cat([top_i, (top_p * 1e4).round().long()], -1).tolist(),
        header=[*header, ("think steps on this page", steps_note), *bpc], reading=None,
    )
    if learn:
        section["reading"] = reading(model, ids, thinking, args, steps)
    return section


def bits_per_char(logp1, target, nll2) -> list:
    """The header's bits per character of the page's characters: System 1, System 2 and System 1 at the temperature
    that fits the even-numbered characters best, scored (beside System 2) on the odd-numbered ones, so that the
    temperature never sees the characters it scores."""
    import torch
    import torch.nn.functional as F

    nll1 = -logp1.gather(-1, target[:, None])[:, 0]
    items = [("bits/char System 1", f"{float(nll1.mean()) / math.log(2):.4f}"),
             ("bits/char System 2", f"{float(nll2.mean()) / math.log(2):.4f}")]
    tempered = torch.stack([F.cross_entropy(logp1 / t, target, reduction="none") for t in TEMPERATURES], -1)
    calibrated = calibrated_system1(tempered, nll2, torch.arange(len(target)) % 2 == 0)
    if calibrated is not None:
        items.append(("bits/char calibrated System 1 (odd characters)",
                      f"{calibrated['system1_calibrated'] / math.log(2):.4f} at T={calibrated['temperature']:.3g} "
                      f"(System 2 there: {calibrated['system2'] / math.log(2):.4f})"))
    return items


def reading(model, ids, thinking: dict, args, steps: int) -> dict:
    """Learning while reading over the page's characters, read in order in windows of adapt_window: per character
    the gain, NLL static minus adapted (score_reading; System 2 when the run thinks, else System 1), and the adapted
    model's probability of it and its top candidates (one forward with use_adaptation=True, which scores each window
    before it learns from it)."""
    import torch

    adapt = scoring_adapt_flags(args)
    adapt["adapt_window"] = thinking["adapt_window"] or model.config.adapt_window or model.config.block_size
    think = dict(use_thinking=thinking["use_thinking"], think_steps=steps, think_lr=thinking["think_lr"])
    ids = ids.to(model.device)
    nll = score_reading(model, ids, **think, **adapt)
    with torch.no_grad():
        out = model(ids[None], use_cache=False, use_adaptation=True, return_energy_trace=False, **think, **adapt)
    probs = torch.softmax(out.logits[0, :-1].float(), -1).cpu()
    top_p, top_i = probs.topk(min(TOP, probs.shape[-1]), -1)
    chosen = probs.gather(-1, ids[1:, None].cpu())[:, 0]
    return dict(gain=_rounded(nll["nll2_static"] - nll["nll2_adapted"]), p=_probabilities(chosen),
                top=torch.cat([top_i, (top_p * 1e4).round().long()], -1).tolist(),
                system="System 2" if thinking["use_thinking"] else "System 1",
                bits_static=float(nll["nll2_static"].mean()) / math.log(2),
                bits_adapted=float(nll["nll2_adapted"].mean()) / math.log(2),
                settings=f"adapt_lr={thinking['adapt_lr']:.4g}, a window of {adapt['adapt_window']} characters")


def generation_page(model, tokenizer, ids, prompt_len: int, thinking: dict, args, command: str) -> Path:
    """--html of a generate run: the prompt and the chosen continuation (ids, 1-D), details for the first
    --html_chars characters, learning while reading shown where the run learns (else the page says it is absent)."""
    n = min(len(ids) - 1, args.html_chars)
    learn = thinking["use_adaptation"]
    header = [("model", str(args.model_name_or_path)), ("landscape", model.config.landscape),
              ("text", f"a prompt of {prompt_len} characters, then {len(ids) - prompt_len} generated"),
              ("learning while reading", "on" if learn else "off (the run does not learn while reading)")]
    section = model_section(model, tokenizer, ids[:n + 1], Path(args.model_name_or_path).name, thinking, args, learn,
                            header)
    section["prompt"] = prompt_len
    rest = tokenizer.decode(ids[n + 1:].tolist())
    details = (f"Details for the first {n} of {len(ids) - 1} predicted characters (--html_chars "
               f"{args.html_chars}); the rest of the text is shown plain." if rest else
               f"Details for all {n} predicted characters (the first character is read, never predicted).")
    title = f"nanoebm: {Path(args.model_name_or_path).name} thinking and learning, character by character"
    return write_page(Path(args.html), title, command, [section], rest, details)


def comparison_section(model, tokenizer, val: str, args, row: dict) -> dict:
    """--compare --html: one model's section, over the first --html_chars + 1 characters of the validation text
    (the same characters for every model), its header with the table's validation bits per character. Learning
    while reading is shown where the comparison measured it (--reading_chars > 0, a model that can learn)."""
    import torch

    ids = torch.tensor(encode(tokenizer, val[:args.html_chars + 1], f"the validation text (for {row['model']})"))
    calibrated = row["bpc_system1_calibrated"]
    header = [("model", row["path"]), ("landscape", row["landscape"]),
              ("validation bits/char (the table)",
               f"System 1 {row['bpc_system1']:.4f}, System 2 {row['bpc_system2']:.4f}, calibrated System 1 "
               + (f"{calibrated:.4f}" if calibrated is not None else "-"))]
    learn = row.get("bpc_system1_adapted") is not None
    section = model_section(model, tokenizer, ids, row["model"], resolved_thinking(model, args), args, learn, header)
    section["prompt"] = 1
    return section


def comparison_page(sections: list[dict], val: str, args, command: str) -> Path:
    """--compare --html: one page, a section per model, all over the same first characters of the validation
    text."""
    n = len(sections[0]["chars"]) - 1
    title = f"nanoebm: {len(sections)} models read the validation text"
    details = (f"Details for the first {n} predicted characters of the validation text ({len(val)} characters; "
               f"--html_chars {args.html_chars}), the same characters for every model.")
    return write_page(Path(args.html), title, command, sections, "", details)


def _probabilities(p):
    """Probabilities as integers in units of 1e-4: four digits, in fewer bytes than floats."""
    return (p * 1e4).round().long().tolist()


def _rounded(x, digits: int = 4):
    """Floats to `digits` significant digits: KL is often 1e-5, which decimals would round to 0."""
    def r(v):
        return float(f"{v:.{digits}g}")

    return [[r(v) for v in row] if isinstance(row, list) else r(row) for row in x.tolist()]


def write_page(path: Path, title: str, command: str, sections: list[dict], rest: str, details: str) -> Path:
    """The page: the template with the sections (one per model) and the page's own lines written into it. `rest`:
    the text past the characters with details, shown plain; `details`: the line that says which characters have
    details."""
    data = dict(title=title, command=command, sections=sections, rest=rest, details=details)
    # "<" escaped: no "</script>" or "<!--" inside the script element, and JSON.parse reads it back as "<"
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    html = TEMPLATE.read_text(encoding="utf-8").replace("__NANOEBM_DATA__", payload)
    try:
        path.write_text(html, encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot write --html {path}: {error}") from error
    note(f"wrote {path} ({len(html.encode()) / 1e6:.2f} MB)")
    return path


def log_page(path: Path, command: str) -> None:
    """--report_to wandb: the page as wandb.Html in a run of its own (project $WANDB_PROJECT, else nanoebm), as it
    is, with nothing injected (wandb.Html would otherwise link a stylesheet from the network)."""
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "nanoebm"), job_type="generate",
                     config={"command": command})
    run.log({"page": wandb.Html(path, inject=False)})
    where = run.url or run.dir
    run.finish()
    note(f"logged {path} to W&B: {where}")
