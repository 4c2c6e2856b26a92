"""run_generate.py's pictures: what thinking did along a generated text (--plot) and the model comparison (--compare
--plot). matplotlib and torch are imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import math
from pathlib import Path

from nanoebm.analysis import energy_bowl, note, position_stats, resolved_thinking, token_strings
from nanoebm.cli import UsageError


def write_plots(model, ids, P: int, tokens: list[str], scores, row: int, tokenizer, args, folder: Path) -> list[Path]:
    """The --plot pictures of sequence `row` of `scores` (score_continuations over ids, targets from P on) in folder:
    kl_strip.png always; thinking_at_position.png, energy_trace.png and energy_descent.png when thinking ran.
    `tokens` are the generated tokens' strings (token_strings), one per scored position."""
    make_folder(folder, "--plot")
    s = position_stats(scores, row)
    vocab = token_strings(tokenizer, range(model.config.vocab_size))
    n = len(tokens)
    if args.plot_position is not None:
        if not -n <= args.plot_position < n:
            raise UsageError(f"--plot_position {args.plot_position} is outside the {n} generated tokens")
        index = args.plot_position % n
    else:
        index = int(s["kl"].argmax())
    written = [plot_kl_strip(tokens, s["kl"].tolist(), folder / "kl_strip.png")]
    trace = scores["trace"][row] if scores["trace"] is not None else None
    if trace is None:
        steps = resolved_thinking(model, args)["think_steps"]
        note(f"think_steps={steps}: nothing to draw but kl_strip.png (no thinking, no energy trace)")
    else:
        bowl = energy_bowl(model, ids, P + index, int(scores["window_start"][index]), args.think_steps,
                           args.think_lr)
        written.append(plot_thinking_at_position(
            tokens, index, scores["logp1"][row, index], scores["logp2"][row, index], vocab,
            int(scores["targets"][row, index]), bowl, folder / "thinking_at_position.png"))
        written.append(plot_energy_trace(trace, tokens, folder / "energy_trace.png"))
        written.append(plot_energy_descent(trace, bowl, index, folder / "energy_descent.png"))
    note("wrote " + ", ".join(str(p) for p in written))
    return written


def make_folder(folder: Path, flag: str = "") -> Path:
    """`folder`, made where it is missing, or a UsageError naming it (and the flag that gave it)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create {flag + ' folder ' if flag else ''}{folder}: {error}") from error
    return folder


def show_char(c: str) -> str:
    """A token as drawn: whitespace characters made visible, anything else as it is."""
    return {"\n": "↵", " ": "␣", "\t": "⇥"}.get(c, c)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path, dpi: int = 90) -> Path:
    """Lay out, write and close a figure (pyplot keeps every open one alive)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _plain_text(draw):
    """Run a drawing function with mathtext off: generated text is full of '$'."""
    import functools

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return wrapper


@_plain_text
def plot_energy_trace(trace, tokens: list[str], path: Path, n_examples: int = 6) -> Path:
    """J_k - J_0 across thinking steps for every generated position: the mean (with 10-90% band) and a few
    individual positions; and the gap J_0 - J_K along the text."""
    import torch

    plt = _pyplot()
    n, K1 = trace.shape
    steps = list(range(K1))
    rel = trace - trace[:, :1]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.6]})
    picks = sorted(set(torch.linspace(0, n - 1, min(n_examples, n)).round().long().tolist()))
    for i in picks:
        ax.plot(steps, rel[i].tolist(), lw=1, alpha=0.7, marker=".", label=f"#{i} {show_char(tokens[i])!r}")
    lo, hi = torch.quantile(rel, 0.1, dim=0), torch.quantile(rel, 0.9, dim=0)
    ax.fill_between(steps, lo.tolist(), hi.tolist(), color="k", alpha=0.1, label="10-90% of positions")
    ax.plot(steps, rel.mean(0).tolist(), color="k", lw=2.5, marker="o", label=f"mean over {n} positions")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(steps)
    ax.set_xlabel("thinking step k")
    ax.set_ylabel("J_k - J_0 (expected energy)")
    ax.set_title("energy descent per position")
    ax.legend(fontsize=7, loc="lower left")
    gap = (trace[:, 0] - trace[:, -1]).tolist()
    ax2.plot(range(n), gap, lw=0.8, color="tab:blue")
    ax2.fill_between(range(n), 0, gap, alpha=0.3, color="tab:blue")
    ax2.axhline(sum(gap) / n, color="k", ls="--", lw=1, label=f"mean gap {sum(gap) / n:.4g}")
    ax2.set_xlabel("generated token")
    ax2.set_ylabel("gap J_0 - J_K")
    ax2.set_title("energy gap thinking bought, along the text")
    ax2.legend(fontsize=8)
    return _save(plt, fig, path)


def _plot_distribution(ax, logp1, logp2, vocab: list[str], chosen: int, top: int = 8):
    import torch

    p1, p2 = logp1.exp(), logp2.exp()
    ids = list(dict.fromkeys(torch.topk(p2, min(top, p2.numel())).indices.tolist()
                             + torch.topk(p1, min(top, p1.numel())).indices.tolist()))
    ids.sort(key=lambda i: -float(p2[i]))
    ids = ids[:12]
    x = torch.arange(len(ids)).float()
    ax.bar((x - 0.2).tolist(), [float(p1[i]) for i in ids], width=0.4, label="System 1 (before)", color="tab:grey")
    ax.bar((x + 0.2).tolist(), [float(p2[i]) for i in ids], width=0.4, label="System 2 (after)", color="tab:orange")
    ax.set_xticks(x.tolist())
    labels = ax.set_xticklabels([show_char(vocab[i]) for i in ids], fontsize=11)
    for label, i in zip(labels, ids, strict=True):
        if i == chosen:
            label.set_color("tab:red")
            label.set_fontweight("bold")
    ax.set_ylabel("probability")
    ax.legend(fontsize=8)


def _plot_bowl(ax, bowl: dict):
    """J along the line v0 -> vK, the thinking iterates on it, and the per-logit trust region |v_y - v0_y| <=
    think_max_move shaded where it ends (beyond |t| = trust_t some logit has moved further)."""
    ax.plot(bowl["ts"], bowl["J"], color="tab:blue", lw=2, label="J(v0 + t (vK - v0))")
    if bowl["J_k"]:
        ax.scatter(bowl["t_k"], bowl["J_k"], color="tab:red", zorder=3, s=25, label="thinking iterates (projected)")
    low, high = ax.get_ylim()  # autoscaled to the curve and the points; room above for the legend, below for names
    ax.set_ylim(low - (0.3 if bowl["J_k"] else 0.0) * (high - low), high + 0.3 * (high - low))
    if bowl["J_k"]:
        _name_iterates(ax, bowl["t_k"], bowl["J_k"])
    trust, (first, last) = bowl.get("trust_t"), (bowl["ts"][0], bowl["ts"][-1])
    if trust is not None:
        label = f"outside the trust region: some logit moved > think_max_move = {bowl['think_max_move']:.3g}"
        for low, high in ((trust, last), (first, -trust)):
            if low < high:
                ax.axvspan(low, high, color="grey", alpha=0.12, lw=0, label=label)
                label = None
    ax.axvline(0, color="grey", lw=0.5, ls=":")
    ax.axvline(1, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("t  (0 = System 1 logits v0, 1 = refined logits vK)")
    ax.set_ylabel("expected energy J")
    ax.legend(fontsize=7, loc="upper right")


def _name_iterates(ax, t_k, J_k, most: int = 6):
    """Name the iterates in the band left under the curve, evenly spaced in the order of their t, each with a line
    to its point: iterates close together on the line would print their names over one another. A long descent
    names v0, vK and a few between (at most `most`)."""
    K = len(t_k) - 1
    named = sorted({0, K, *range(0, K + 1, max(1, math.ceil(K / (most - 1))))}, key=lambda k: (t_k[k], k))
    for i, k in enumerate(named):
        ax.annotate(f"v{k}" if k < K or K == 0 else f"vK=v{k}", xy=(t_k[k], J_k[k]),
                    xytext=((i + 1) / (len(named) + 1), 0.06), textcoords="axes fraction", ha="center", fontsize=8,
                    color="tab:red", arrowprops=dict(arrowstyle="-", color="tab:red", lw=0.6, alpha=0.6))


def move_summary(bowl: dict) -> str:
    """The largest move of one logit and the per-logit trust region it answers to: what the shading marks."""
    limit = bowl["think_max_move"]
    bound = f"(trust region {limit:.3g} per logit)" if limit > 0 else "(no trust region)"
    return f"max_y |vK - v0| = {bowl['max_move']:.3g} {bound}"


@_plain_text
def plot_thinking_at_position(chars: list[str], index: int, logp1, logp2, vocab, chosen: int, bowl: dict,
                              path: Path) -> Path:
    plt = _pyplot()
    context = "".join(show_char(c) for c in chars[max(0, index - 24):index])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    _plot_distribution(ax, logp1, logp2, vocab, chosen)
    ax.set_title(f"next character after ...{context!s} (chose {show_char(vocab[chosen])!r})", fontsize=9)
    _plot_bowl(ax2, bowl)
    ax2.set_title(f"energy bowl at generated character #{index}\n{move_summary(bowl)}", fontsize=9)
    return _save(plt, fig, path)


@_plain_text
def plot_kl_strip(tokens: list[str], kl, path: Path, width: int = 64, max_tokens: int = 1024) -> Path:
    """A heat strip: each generated token (a character, or a longer token) on a cell coloured by KL(S2 || S1) at
    that position; `kl` holds one value per token."""
    import numpy as np

    plt = _pyplot()
    values = np.asarray(kl, dtype=float)
    if len(values) != len(tokens):
        raise ValueError(f"kl has {len(values)} values for {len(tokens)} tokens: one per token")
    offset = max(0, len(tokens) - max_tokens)
    tokens, values = tokens[offset:], values[offset:]
    rows = math.ceil(len(tokens) / width)
    grid = np.full((rows, width), np.nan)
    grid.flat[:len(values)] = values
    fig, ax = plt.subplots(figsize=(width * 0.17 + 1.5, rows * 0.3 + 1.2))
    vmax = max(float(np.nanmax(values)) if len(values) else 0.0, 1e-9)
    image = ax.imshow(grid, cmap="YlOrRd", vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
    for i, token in enumerate(tokens):
        r, col = divmod(i, width)
        dark = values[i] > 0.6 * vmax
        ax.text(col, r, show_char(token), ha="center", va="center", fontsize=7 if len(token) == 1 else 4,
                color="white" if dark else "black", family="DejaVu Sans Mono")
    ax.set_xticks([])
    ax.set_yticks(range(rows))
    ax.set_yticklabels([str(offset + r * width) for r in range(rows)], fontsize=7)
    ax.set_title("how much thinking changed each choice: KL(System 2 || System 1) in nats"
                 + (f" (last {max_tokens} tokens)" if offset else ""), fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    return _save(plt, fig, path)


@_plain_text
def plot_energy_descent(trace, bowl: dict, index: int, path: Path) -> Path:
    """The README picture: J_k - J_0 over thinking steps (mean and band over positions) and the bowl at one."""
    import torch

    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.5))
    steps = list(range(trace.shape[1]))
    rel = trace - trace[:, :1]
    lo, hi = torch.quantile(rel, 0.1, dim=0), torch.quantile(rel, 0.9, dim=0)
    ax.fill_between(steps, lo.tolist(), hi.tolist(), alpha=0.2, color="tab:blue", label="10-90% of positions")
    ax.plot(steps, rel.mean(0).tolist(), marker="o", lw=2, color="tab:blue",
            label=f"mean over {trace.shape[0]} positions")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(steps)
    ax.set_xlabel("thinking step k")
    ax.set_ylabel("J_k - J_0")
    ax.set_title(f"expected energy across thinking steps (mean gap J0 - JK = {float(-rel[:, -1].mean()):.3g})",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    _plot_bowl(ax2, bowl)
    ax2.set_title(f"J along the line v0 -> vK at one position (#{index})", fontsize=9)
    return _save(plt, fig, path, dpi=100)


@_plain_text
def plot_comparison(rows: list[dict], path: Path) -> Path:
    plt = _pyplot()
    names = [r["model"] for r in rows]
    x = list(range(len(rows)))
    fig, axes = plt.subplots(1, 3, figsize=(4 + 2.2 * len(rows), 3.8))
    ax = axes[0]
    for offset, key, name, color in ((-0.2, "bpc_system1", "System 1", "tab:grey"),
                                     (0.2, "bpc_system2", "System 2", "tab:orange")):
        bars = ax.bar([i + offset for i in x], [r[key] for r in rows], 0.4, label=name, color=color)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    low = min(min(r["bpc_system1"], r["bpc_system2"]) for r in rows)
    ax.set_ylim(bottom=max(0.0, low - 0.25))
    ax.set_title("validation bits per character (lower is better)", fontsize=9)
    ax.legend(fontsize=8)
    axes[1].bar(x, [r["energy_gap"] or 0.0 for r in rows], 0.5, color="tab:blue")
    axes[1].set_title("energy gap J0 - JK (thinking)", fontsize=9)
    ax = axes[2]
    ax.bar([i - 0.2 for i in x], [r["tokens_per_s_system1"] for r in rows], 0.4, label="System 1", color="tab:grey")
    ax.bar([i + 0.2 for i in x], [r["tokens_per_s_system2"] for r in rows], 0.4, label="System 2",
           color="tab:orange")
    ax.set_title("decode tokens/s (greedy)", fontsize=9)
    ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    return _save(plt, fig, path)

