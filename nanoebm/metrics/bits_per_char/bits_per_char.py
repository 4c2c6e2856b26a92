"""Bits per character: the standard score for character-level language models.

Load it by path (works offline; evaluate copies this script into its modules cache and imports it):

    import evaluate
    bpc = evaluate.load("/abs/path/to/metrics/bits_per_char")   # folder name == this file's stem
    bpc.compute(nll=per_char_nll)   # or add_batch(nll=...) per step, then compute()

`nll` holds one value per predicted character: -log p(char | context) in nats (natural log, what
torch's cross_entropy returns). Averaging per character (not per sequence) keeps the score
independent of how the text was cut into batches.
"""

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Mean per-character negative log-likelihood, reported in nats, in bits (nats / ln 2) and as
perplexity (exp of the mean nats). Input: one float per predicted character, `nll`, in nats.
"""

_KWARGS_DESCRIPTION = """
Args:
    nll (`list[float]`): per-character negative log-likelihood in nats (>= 0).
Returns:
    nats_per_char (`float`): mean nll.
    bits_per_char (`float`): mean nll / ln 2.
    perplexity (`float`): exp(mean nll).
    n_chars (`int`): number of characters averaged.
Examples:
    >>> import math, evaluate
    >>> bpc = evaluate.load("metrics/bits_per_char")
    >>> bpc.compute(nll=[math.log(2)] * 4)["bits_per_char"]  # doctest: +ELLIPSIS
    1.0...
"""

_CITATION = ""

# Slack for float32 round-off when a model assigns probability ~1 (nll ~ 0).
_NEGATIVE_TOLERANCE = 1e-6


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BitsPerChar(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll": datasets.Value("float32")}),
        )

    def _compute(self, nll):
        # Accumulate in float64: a float32 sum over ~1M characters loses digits.
        values = np.asarray(nll, dtype=np.float64).reshape(-1)
        n = int(values.size)
        if n == 0:
            raise ValueError("bits_per_char: no values given (nll is empty).")
        if np.isnan(values).any():
            raise ValueError("bits_per_char: nll contains NaN.")
        if values.min() < -_NEGATIVE_TOLERANCE:
            raise ValueError(
                f"bits_per_char: nll must be >= 0 (negative log-likelihood in nats); got min "
                f"{values.min():.4g}. Did you pass log-probabilities instead of their negatives?"
            )
        mean = float(values.mean())
        return {
            "nats_per_char": mean,
            "bits_per_char": mean / math.log(2),
            "perplexity": math.exp(mean) if mean < 709.0 else math.inf,
            "n_chars": n,
        }
