"""run_generate.py's generate mode, step by step: the device and the model loaded from a saved folder, the
generate call (timed, decoded), the candidate --num_candidates keeps, and what is printed and written (the summary
line, --output_json's record). torch and transformers are imported inside the functions (--help stays fast).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nanoebm.analysis import note, token_strings
from nanoebm.cli import UsageError
from nanoebm.folders import check_model_folder, loading


def resolve_device(name: str):
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
    if name == "mps" and not mps:
        raise UsageError("--device mps: Apple's MPS backend is not available here; use --device cpu (or auto)")
    return torch.device(name)


def load_model(path: str, device, unk_token: str | None = None, dtype: str = "auto"):
    """(model, tokenizer) from a saved folder, through the Auto classes (the folder's own code), weights in `dtype`;
    UsageError with the reason otherwise (nanoebm/folders.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _, weights = check_model_folder(path)
    with loading(folder):
        tokenizer = AutoTokenizer.from_pretrained(
            folder, trust_remote_code=True, **({"unk_token": unk_token} if unk_token is not None else {})
        )
    with loading(folder, weights):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype)
    if tokenizer.vocab_size > model.config.vocab_size:  # characters only: the pad id lies outside the vocabulary
        raise UsageError(f"{str(path)!r}: the tokenizer has {tokenizer.vocab_size} characters but the model only "
                         f"{model.config.vocab_size} ids")
    return model.to(device).eval(), tokenizer


# flags a generate run's JSON leaves out
COMPARE_ONLY = ("compare", "data_path", "eval_blocks", "reading_chars", "output_dir")


@dataclass
class Generated:
    """What one generate call made, as the printing, the summary, the pictures and the JSON read it."""

    prompt: str
    sequences: object  # (n, P + new) ids on the CPU: the prompt, then each continuation
    P: int  # the prompt's length in tokens
    texts: list[str]  # each continuation, decoded
    tokens: list[list[str]]  # each continuation's tokens (token_strings): what the pictures and the JSON index
    seconds: float
    tokens_per_s: float
    stats: list[dict] | None = None  # position_stats per continuation, where scored
    chosen: int = 0  # the continuation printed in full and summarised
    candidates: list[dict] | None = None  # with --num_candidates: every candidate's scores


def generate(model, tokenizer, prompt: str, prompt_ids: list[int], stream: bool, seed: int, kwargs: dict) -> Generated:
    """model.generate from the seed (printing the text as it comes when `stream`), timed, decoded."""
    import torch
    from transformers import TextStreamer, set_seed

    set_seed(seed)
    input_ids = torch.tensor([prompt_ids], device=model.device)
    streamer = TextStreamer(tokenizer) if stream else None
    started = time.perf_counter()
    with torch.no_grad():
        sequences = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **kwargs)
    elapsed = time.perf_counter() - started
    sequences, P = sequences.cpu(), len(prompt_ids)
    texts = [tokenizer.decode(row[P:].tolist()) for row in sequences]
    tokens = [token_strings(tokenizer, row[P:].tolist()) for row in sequences]
    tokens_per_s = len(sequences) * kwargs["max_new_tokens"] / max(elapsed, 1e-9)
    return Generated(prompt, sequences, P, texts, tokens, elapsed, tokens_per_s)


def choose_candidate(gen: Generated, select: str, use_thinking: bool) -> tuple[int, list[dict]]:
    """--num_candidates: the candidate `select` prefers, and every candidate's scores (listed on stderr)."""
    nll_key = "nll2" if use_thinking else "nll1"  # the distribution the candidates were sampled from
    candidates = [dict(index=i, total_energy=float(s["energy"].sum()), mean_energy=float(s["energy"].mean()),
                       nll=float(s[nll_key].sum()), bits_per_char=float(s[nll_key].mean()) / math.log(2),
                       text=gen.texts[i]) for i, s in enumerate(gen.stats)]
    key = "total_energy" if select == "min_energy" else "nll"
    chosen = min(range(len(candidates)), key=lambda i: candidates[i][key])
    note(f"{len(candidates)} candidates, selected by {select} "
         f"({'sum of the energies of the chosen characters' if key == 'total_energy' else 'sum of -log p'}):")
    for c in candidates:
        preview = c["text"][:48].replace("\n", "↵")
        note(f"  {'*' if c['index'] == chosen else ' '} #{c['index']}: energy {c['total_energy']:10.3f} "
             f"({c['mean_energy']:+.4f}/char)  nll {c['bits_per_char']:.3f} bits/char  {preview!r}")
    return chosen, candidates


def print_texts(gen: Generated, stream: bool) -> None:
    """stdout: the chosen candidate, or every sample under a header, or the one text unless it was streamed."""
    n = len(gen.texts)
    if gen.candidates is not None:
        print(gen.prompt + gen.texts[gen.chosen], flush=True)
    elif n > 1:
        for i, text in enumerate(gen.texts):
            print(f"----- sample {i + 1}/{n} -----\n{gen.prompt}{text}", flush=True)
    elif not stream:
        print(gen.prompt + gen.texts[0], flush=True)


def summary_line(gen: Generated, max_new_tokens: int) -> str:
    """Speed, and where the text was scored, the chosen text's bits per character, KL and energy gap."""
    summary = (f"{len(gen.texts) * max_new_tokens} characters in {gen.seconds:.2f} s "
               f"({gen.tokens_per_s:.1f} tokens/s)")
    if gen.stats is not None:
        s = gen.stats[gen.chosen]
        summary += (f"; chosen text: System 1 {float(s['nll1'].mean()) / math.log(2):.3f} / System 2 "
                    f"{float(s['nll2'].mean()) / math.log(2):.3f} bits/char, "
                    f"mean KL(S2||S1) {float(s['kl'].mean()):.4g}")
        if s["gap"] is not None:
            summary += f", mean energy gap J0-JK {float(s['gap'].mean()):.4g}"
    return summary


def generation_record(gen: Generated, args, thinking: dict, model, device) -> dict:
    """--output_json: the prompt, the chosen text with its per-token numbers, the settings in force, and (several
    continuations) every candidate or sample."""
    generate_only = {k: v for k, v in asdict(args).items() if k not in COMPARE_ONLY}
    settings = {**generate_only, **thinking, "device": str(device), "landscape": model.config.landscape,
                "block_size": model.config.block_size, "top_k": args.top_k or 0}
    samples = [dict(text=text, tokens=token_records(gen.sequences[i, gen.P:].tolist(), gen.tokens[i], gen.stats[i]))
               for i, text in enumerate(gen.texts)]
    record = dict(prompt=gen.prompt, text=gen.texts[gen.chosen], model=str(args.model_name_or_path),
                  settings=settings, tokens=samples[gen.chosen]["tokens"],
                  summary=summary_record(gen.stats[gen.chosen], gen.seconds, gen.tokens_per_s), selected=gen.chosen)
    if gen.candidates is not None:
        record["candidates"] = gen.candidates
    if len(samples) > 1:
        record["samples"] = samples
    return record


def token_records(ids: list[int], tokens: list[str], s: dict) -> list[dict]:
    """One record per generated token: its id, its text ("char": a character, or a longer token) and its numbers."""
    gap = s["gap"].tolist() if s["gap"] is not None else [None] * len(tokens)
    return [dict(id=i, char=c, p_system1=float(p1), p_system2=float(p2), energy=float(e), energy_gap=g, kl=float(k))
            for i, c, p1, p2, e, g, k in zip(ids, tokens, s["p1"].tolist(), s["p2"].tolist(), s["energy"].tolist(),
                                             gap, s["kl"].tolist(), strict=True)]


def summary_record(s: dict, elapsed: float, tokens_per_s: float) -> dict:
    return dict(
        seconds=elapsed, tokens_per_s=tokens_per_s, total_energy=float(s["energy"].sum()),
        bits_per_char_system1=float(s["nll1"].mean()) / math.log(2),
        bits_per_char_system2=float(s["nll2"].mean()) / math.log(2), mean_kl=float(s["kl"].mean()),
        mean_energy_gap=float(s["gap"].mean()) if s["gap"] is not None else None,
    )


def write_json(record: dict, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error}") from error
    note(f"wrote {path}")
