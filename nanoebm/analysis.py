"""What run_generate.py computes from a loaded nanoebm model, shared with its pictures (nanoebm.plots) and its model
comparison (nanoebm.compare): the thinking settings in force, teacher-forced per-position scores, the energy bowl
along the thinking direction, encoding text with a clear error, and the CLI's progress lines on stderr.

Importing it costs no torch or transformers (they are imported where they are used).
"""

from __future__ import annotations

import sys

from nanoebm.cli import UsageError
from nanoebm.scoring import score_batch

PROG = "run_generate.py"


def note(message: str) -> None:
    print(f"[{PROG}] {message}", file=sys.stderr, flush=True)


def encode(tokenizer, text: str, what: str = "the prompt") -> list[int]:
    try:
        return tokenizer(text)["input_ids"]
    except ValueError as error:
        raise UsageError(f"{what} cannot be encoded: {error} On the command line: --unk_token ' '.") from error


def token_strings(tokenizer, ids) -> list[str]:
    """The text of each token id: a character, or a longer token ('<pad>', one added with add_tokens), or '<id N>'
    for an id the model has and the tokenizer lacks (a vocabulary resized past it). The pictures and the JSON index
    these, one per position scored, never the characters of the decoded text, which a longer token would shift."""
    strings = []
    for i in ids:
        try:
            token = tokenizer.convert_ids_to_tokens(int(i))
        except (ValueError, IndexError, KeyError):
            token = None
        strings.append(token if isinstance(token, str) else f"<id {int(i)}>")
    return strings


def thinking_module(model):
    """The modeling module the model was loaded from (the saved folder's copy), for `expected_energy`."""
    return sys.modules[type(model).__module__]


# configuration_nanoebm.ADAPT_FIELDS, named here without importing torch: run_generate's learning flags
ADAPTING = ("use_adaptation", "adapt_lr", "adapt_params", "adapt_rule", "adapt_decay", "adapt_window", "adapt_rank",
            "adapt_on_output")


def scoring_adapt_flags(args) -> dict:
    """The adapt_* flags a run gave that scoring with learning takes (--compare, the page): not the switch, which
    scoring sets itself, nor learning from generated text, which reading a given text has none of."""
    return {name: getattr(args, name) for name in ADAPTING if name not in ("use_adaptation", "adapt_on_output")
            and getattr(args, name, None) is not None}


def resolved_thinking(model, args) -> dict:
    """use_thinking, think_steps and think_lr as a run uses them, and whether it learns while reading (with the rate
    and window): the flags where given, else the model's own."""
    steps = args.think_steps if args.think_steps is not None else int(model.config.think_steps)
    alpha = args.think_lr if args.think_lr is not None else float(model.think_lr.detach())
    resolved = dict(use_thinking=args.use_thinking and not args.no_thinking, think_steps=steps, think_lr=alpha)
    for name in ("use_adaptation", "adapt_lr", "adapt_window"):
        given = getattr(args, name, None)
        resolved[name] = given if given is not None else getattr(model.config, name, None)
    resolved["use_adaptation"] = bool(resolved["use_adaptation"])
    if resolved["adapt_window"] is None and resolved["use_adaptation"]:
        resolved["adapt_window"] = model.config.block_size
    return resolved


# ----------------------------------------------------------------------------------------------------------------
# Teacher-forced analysis


def score_continuations(model, ids, start: int, think_steps: int | None = None, think_lr: float | None = None,
                        steps: bool = False):
    """Per-position data for the targets ids[:, start:] of a batch of equally long sequences (B, L).

    One teacher-forced forward (nanoebm.scoring) with thinking on (think_steps, think_lr as given, else the model's)
    when the text fits in block_size; otherwise windows of block_size characters that overlap by half, so that each
    target reads between block_size // 2 and block_size characters of context. Returns CPU tensors:
    targets (B, n), logp1 / logp2 (B, n, V) log-probabilities of System 1 (-E_base) and of the refined logits,
    energy (B, n) the energy of the target as the next token (E_base; for ebt the scalar energy of its one-hot),
    trace (B, n, K + 1) J at v_0..v_K or None without thinking steps,
    window_start (n,) where each target's window began;
    with `steps`: logp_steps (B, n, K, V) the log-probabilities after each thinking step (score_batch).
    """
    import torch

    B, L = ids.shape
    if not 1 <= start < L:
        raise ValueError(f"start={start} must be in [1, {L})")
    block = model.config.block_size
    stride = max(1, block // 2)
    parts = {k: [] for k in ("targets", "logp1", "logp2", "energy", "trace", "window_start", "logp_steps")}
    j = start
    while j < L:
        a = max(0, min(j - max(1, block - stride), L - 1 - block))
        b = min(L - 1, a + block)
        scores = score_batch(model, ids[:, a:b], ids[:, a + 1:b + 1], think_steps=think_steps, think_lr=think_lr,
                             detail=True, steps=steps)
        sl = slice(j - 1 - a, b - a)  # the targets ids[:, j:b + 1], not yet scored by an earlier window
        parts["targets"].append(ids[:, j:b + 1].cpu())
        for key in ("logp1", "logp2", "energy", "trace", "logp_steps"):
            if scores.get(key) is not None:
                parts[key].append(scores[key][:, sl].cpu())
        parts["window_start"].append(torch.full((b + 1 - j,), a, dtype=torch.long))
        j = b + 1
    result = {k: torch.cat(v, dim=1 if k != "window_start" else 0) for k, v in parts.items() if v}
    result.setdefault("trace", None)
    return result


def position_stats(scores, row: int = 0) -> dict:
    """Per-token numbers of one sequence of `score_continuations`."""
    logp1, logp2, targets = scores["logp1"][row], scores["logp2"][row], scores["targets"][row]
    chosen1 = logp1.gather(-1, targets[:, None])[:, 0]
    chosen2 = logp2.gather(-1, targets[:, None])[:, 0]
    kl = (logp2.exp() * (logp2 - logp1)).sum(-1).clamp(min=0)
    trace = scores["trace"]
    gap = (trace[row, :, 0] - trace[row, :, -1]) if trace is not None else None
    return dict(p1=chosen1.exp(), p2=chosen2.exp(), nll1=-chosen1, nll2=-chosen2, kl=kl,
                energy=scores["energy"][row], gap=gap)


def energy_bowl(model, ids, target: int, window_start: int, think_steps=None, think_lr=None, n_points=61):
    """J along the straight line v(t) = v0 + t (vK - v0) from the System 1 logits v0 (t = 0) to the refined logits
    vK (t = 1), for the target ids[0, target], extended on both sides: to t = -0.5 below and, above, to 1.75 or
    past the bottom of J along the line when that lies further out (at most t = 40).

    Returns ts and J(v(t)), J0 = J(v0); the thinking iterates projected on the line (t_k) with their energies J_k
    (the model's own energy trace); the largest move of one logit, max_y |vK - v0|; and where along the line the
    trust region ends (trust_t: every logit within think_max_move of v0 for |t| <= trust_t, None without one). One
    descent (no self-verification); v0 is the start that descent drew (random starts and init noise are replayed
    from the same seed inside a forked RNG, so the caller's random state on the CPU and on CUDA is untouched; on
    other devices, such as MPS, the seed stays set).
    """
    import torch

    cfg, expected_energy = model.config, thinking_module(model).expected_energy
    device = ids.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with torch.no_grad(), torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
        _seed_start(device)
        # one descent; think_samples is passed only where the config has it (a folder's own code may not take it)
        one_descent = {"think_samples": 1} if getattr(cfg, "think_samples", 1) > 1 else {}
        out = model(ids[:, window_start:target], use_cache=False, use_thinking=True, think_steps=think_steps,
                    think_lr=think_lr, return_energy_trace=True, return_landscape=True, **one_descent)
        _seed_start(device)  # the forward's first draw is the start's
        v0 = model.initial_logits(out.landscape.base)
        d = _centred(out.logits) - v0

        def J_at(t):
            J = expected_energy(out.landscape, v0 + t * d, cfg.softmax_temperature, cfg.entropy_weight)[0]
            return float(J[0, -1])

        ts, bowl, J0 = _sample_line(J_at, n_points)
        t_k, J_k = _iterates_on_line(out, v0, d)
    biggest = float(d[0, -1].abs().max())
    trust = (cfg.think_max_move / biggest) if cfg.think_max_move > 0 and biggest > 0 else None
    return dict(ts=ts, J=bowl, J0=J0, t_k=t_k, J_k=J_k, max_move=biggest, think_max_move=cfg.think_max_move,
                trust_t=trust)


def _seed_start(device) -> None:
    """Seed only the generator that draws the descent's start: the CPU's, or the one of the device it runs on."""
    import torch

    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(0)
    elif device.type == "cpu":
        torch.default_generator.manual_seed(0)
    else:
        torch.manual_seed(0)


def _centred(v):
    """The descent runs on centred logits, and the returned ones carry System 1's mean on top: moves are compared
    centred (a constant per position changes no J)."""
    return v.float() - v.float().mean(-1, keepdim=True)


def _sample_line(J_at, n_points: int):
    """(ts, J at each t, J at t = 0): from t = -0.5 to past the bottom of the bowl, found on a coarse grid first."""
    import torch

    coarse = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0]
    values = [J_at(t) for t in coarse]
    J0, floor = J_at(0.0), min(values)
    # the first t where J is within 2% of its lowest value along the line: the bottom of the bowl (or of the
    # slide, when J keeps falling as p sharpens towards one character)
    t_min = next(t for t, J in zip(coarse, values, strict=True) if J - floor <= 0.02 * max(J0 - floor, 1e-12))
    upper = min(40.0, max(1.75, 1.25 * t_min))
    ts = torch.linspace(-0.5, upper, n_points).tolist()
    return ts, [J_at(t) for t in ts], J0


def _iterates_on_line(out, v0, d):
    """(t_k, J_k): each thinking iterate's projection on the line v0 + t d at the last position, with its energy
    from the model's trace (empty without one)."""
    last = d[0, -1]
    norm = float((last * last).sum())
    iterates = [v0, *map(_centred, out.step_logits)]
    t_k = [float(((v[0, -1].float() - v0[0, -1]) * last).sum()) / norm if norm > 0 else 0.0 for v in iterates]
    J_k = out.energy_trace[0, -1].float().tolist() if out.energy_trace is not None else []
    return t_k[:len(J_k)], J_k
