"""Teacher-forced scoring: a model run over text whose every next character is known, and what each position scores.

One loop serves training's evaluation (nanoebm.trainer), run_generate's --compare (nanoebm.compare) and per-position
analysis (nanoebm.analysis) and the benchmarks (bench/thinking.py, bench/ablation.py), so "System 1" and "System 2"
are the same numbers everywhere: System 1 is the landscape's own logits (-E_base), System 2 the logits thinking
refined them to (System 1's when the call does not think).

Importing it costs no torch (imported where used): run_generate --help stays light.
"""

from __future__ import annotations

import math

# System 1 at temperature T reads its logits divided by T. Calibration picks T from this grid, 2.2% apart over
# [0.25, 4] (2 ** (j / 32)): the NLL is flat at its minimum, so a T between two points would lower it only to second
# order in that spacing
TEMPERATURES = tuple(2 ** (j / 32) for j in range(-64, 65))
UNCALIBRATED = TEMPERATURES.index(1.0)


def score_batch(model, inputs, targets, *, use_thinking=True, think_steps=None, think_lr=None, think_samples=None,
                trace=True, detail=False, steps=False, tempered=False, use_adaptation=False) -> dict:
    """Per-position numbers of one teacher-forced forward over `inputs` (B, T) whose next characters are `targets`
    (B, T), as float32 tensors on the model's device:

    nll1, nll2 (B, T): the negative log-likelihood of the target under System 1 and under System 2;
    nll_steps (B, T, K): under the logits after each thinking step v_1 .. v_K (K = 0 when the call does not think);
    trace (B, T, K + 1): the expected energy J at v_0 .. v_K, or None (no thinking, or trace=False, which saves the
    landscape evaluation it costs);
    with `detail`: logp1, logp2 (B, T, V) the log-probabilities of both systems, and energy (B, T) the target's energy
    as the next token (E_base; for ebt the scalar energy of its one-hot, one more backbone pass);
    with `steps`: logp_steps (B, T, K, V) the log-probabilities after each thinking step v_1 .. v_K (the page's
    thinking-steps slider);
    with `tempered`: nll1_tempered (B, T, G) System 1's NLL at each of the G TEMPERATURES (`calibrated_system1`).

    use_thinking, think_steps, think_lr, think_samples: as the model's forward takes them (None: the model's own).
    think_samples reaches the model only when given, so folders saved before it existed still score.
    use_adaptation: False (the default) scores with the weights as they are, whatever the config says; only a True
    reaches the model, so folders saved before learning while reading existed still score (see `score_reading`).
    """
    import torch
    import torch.nn.functional as F

    options = {"think_samples": think_samples} if think_samples is not None else {}
    if use_adaptation or getattr(model.config, "use_adaptation", False):
        options["use_adaptation"] = use_adaptation
    with torch.no_grad():
        out = model(inputs, use_cache=False, use_thinking=use_thinking, think_steps=think_steps, think_lr=think_lr,
                    return_energy_trace=trace, return_landscape=detail, **options)

        def nll(logits):
            return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")

        steps = [nll(v) for v in (out.step_logits or ())]
        scores = dict(nll1=nll(out.system1_logits), nll2=nll(out.logits),
                      nll_steps=torch.stack(steps, -1) if steps else targets.new_zeros(*targets.shape, 0).float(),
                      trace=out.energy_trace.float() if out.energy_trace is not None else None)
        if detail:
            scores.update(logp1=F.log_softmax(out.system1_logits.float(), dim=-1),
                          logp2=F.log_softmax(out.logits.float(), dim=-1),
                          energy=out.landscape.token_energy(targets).float())
        if steps:
            empty = out.logits.new_zeros(*targets.shape, 0, out.logits.shape[-1]).float()  # no thinking: K = 0
            scores["logp_steps"] = (torch.stack([F.log_softmax(v.float(), dim=-1) for v in out.step_logits], 2)
                                    if out.step_logits else empty)
        if tempered:
            system1 = out.system1_logits.float()
            scores["nll1_tempered"] = torch.stack([nll(system1 / t) for t in TEMPERATURES], -1)
    return scores


def score_blocks(model, blocks, batch_size: int, **options) -> dict:
    """`score_batch` over blocks (N, T + 1) of token ids, `batch_size` at a time, each block's first T tokens read
    and its last T predicted: the same per-position tensors, (N, T, ...), on the model's device ({} for no blocks).

    Every block is scored on its own, from its first character: the numbers of equal blocks do not depend on which
    others share their batch."""
    import torch

    parts = []
    for batch in blocks.split(batch_size):
        batch = batch.to(model.device)
        parts.append(score_batch(model, batch[:, :-1], batch[:, 1:], **options))
    if not parts:
        return {}
    return {key: None if parts[0][key] is None else torch.cat([p[key] for p in parts]) for key in parts[0]}


def calibrated_system1(tempered, system2, fit) -> dict | None:
    """System 1 calibrated on some blocks and scored on the others, beside System 2 scored on those same others: a
    temperature is never fitted on the text it scores, so thinking is compared with a System 1 that is as well
    calibrated as it can be without seeing that text.

    tempered (N, G): each block's mean NLL of System 1 at each of TEMPERATURES; system2 (N,) each block's mean NLL of
    System 2, or None; fit (N,) bool: the blocks the temperature is fitted on (the others are scored). Returns the
    fitted temperature and, in nats per character on the scored blocks, system1 (at T = 1), system1_calibrated and
    system2 (None without it); None when either part has no block. A NaN among the fitted numbers makes all NaN.
    """
    import torch

    scored = ~fit
    if not fit.any() or not scored.any():
        return None
    fitted = tempered[fit].mean(0)
    k = int(fitted.argmin()) if torch.isfinite(fitted).all() else None
    held = tempered[scored]
    return dict(temperature=TEMPERATURES[k] if k is not None else math.nan,
                system1=float(held[:, UNCALIBRATED].mean()),
                system1_calibrated=float(held[:, k].mean()) if k is not None else math.nan,
                system2=float(system2[scored].mean()) if system2 is not None else None)


def block_means(scores):
    """Each block's mean NLL of System 1 at every one of TEMPERATURES (N, G) and of System 2 (N,), on the CPU, from
    `score_blocks(..., tempered=True)`."""
    return scores["nll1_tempered"].mean(1).cpu(), scores["nll2"].mean(1).cpu()


def calibrated_on_even_blocks(scores) -> dict | None:
    """`calibrated_system1` of scored blocks, the temperature fitted on the even-numbered ones and scored on the odd
    ones (training's evaluation splits the same way, over the blocks every process gathered)."""
    import torch

    tempered, system2 = block_means(scores)
    return calibrated_system1(tempered, system2, torch.arange(len(tempered)) % 2 == 0)


def against_calibrated(model, blocks, other=None, batch_size: int = 64) -> dict:
    """The model's own thinking (System 2) against System 1 at its best temperature, in nats per character: T fitted
    on the even-numbered `blocks`, which `calibrated_system1` scores on the odd-numbered ones; `other` blocks (an
    out-of-distribution text) are all scored at that same T. {"in": ..., "other": ...} (no "other" without it)."""
    def scored(part):
        return score_blocks(model, part, batch_size, tempered=True, trace=False)

    result = {"in": calibrated_on_even_blocks(scored(blocks))}
    if other is not None and result["in"] is not None and not math.isnan(result["in"]["temperature"]):
        k = TEMPERATURES.index(result["in"]["temperature"])
        tempered, system2 = block_means(scored(other))
        result["other"] = dict(temperature=TEMPERATURES[k], system1=float(tempered[:, UNCALIBRATED].mean()),
                               system1_calibrated=float(tempered[:, k].mean()), system2=float(system2.mean()))
    return result


def score_windows(model, ids, window: int, **thinking) -> dict:
    """Text read in consecutive windows of `window` tokens by the weights as they are, each window read from its own
    start (the last one may be shorter): per-character NLLs nll1, nll2 (N - 1,) float32 on the CPU, in reading order.
    `thinking`: use_thinking, think_steps, think_lr as `score_batch` takes them."""
    import torch

    full = (ids.numel() - 1) // window
    parts = [score_blocks(model, ids[:full * window + 1].unfold(0, window + 1, window), 64, trace=False,
                          **thinking)] if full else []
    if ids.numel() - 1 > full * window:  # the last, shorter window
        rest = ids[full * window:][None]
        parts.append(score_batch(model, rest[:, :-1], rest[:, 1:], trace=False, **thinking))
    return {key: torch.cat([part[key].flatten().cpu() for part in parts]) for key in ("nll1", "nll2")}


def score_reading(model, ids, *, adapt_window=None, use_thinking=True, think_steps=None, think_lr=None,
                  **adapt) -> dict:
    """Text read in order, with and without learning while reading: `ids` (N,) are read in consecutive windows of
    `adapt_window` tokens (the model's own by default), each read from its own start; every character but the first is
    a target. Returns per-character NLLs in reading order, (N - 1,) float32 on the CPU: nll1_static, nll2_static (each
    window scored by the trained weights, `score_windows`) and nll1_adapted, nll2_adapted (each window scored by the
    weights learned from the windows before it: one pass, never two). `adapt`: the other adapt_* settings (the model's
    own where not given); System 2 is the static System 1 where the call does not think."""
    import torch
    import torch.nn.functional as F

    window = adapt_window or model.config.adapt_window or model.config.block_size
    ids = ids.to(model.device)
    thinking = dict(use_thinking=use_thinking, think_steps=think_steps, think_lr=think_lr)
    with torch.no_grad():
        adapted = model(ids[None], use_adaptation=True, adapt_window=window, return_energy_trace=False, **thinking,
                        **adapt)

    def nll(logits):
        return F.cross_entropy(logits[0, :-1].float(), ids[1:], reduction="none").cpu()

    static = score_windows(model, ids, window, **thinking)
    return dict(nll1_static=static["nll1"], nll2_static=static["nll2"], nll1_adapted=nll(adapted.system1_logits),
                nll2_adapted=nll(adapted.logits))
