"""Settings as data: the presets, and how the layers of a run's settings merge, each value keeping where it came from.

A run's settings merge in one order, each layer overriding the ones before it:

    defaults < preset < recipe < the folder being continued or the run being resumed < the command line

The result maps every setting to `(value, source)`; `nanoebm_run.json` records both, so a finished run says which of
its values were chosen and by whom. The model's own settings and their defaults are defined once, in
`configuration_nanoebm.OPTIONS`; the recipes are data in `nanoebm/recipes.py`.
"""

from __future__ import annotations

from typing import NamedTuple

# TrainingArguments defaults nanoebm changes for every preset (nanoGPT's AdamW and schedule)
TRAINING_DEFAULTS = dict(output_dir="out", weight_decay=0.1, adam_beta2=0.95, lr_scheduler_type="cosine_with_min_lr",
                         per_device_eval_batch_size=32, report_to="none")
PRESETS = {
    # the research code's "common overrides" (docs/DESIGN.md): GPU-sized
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, dropout=0.1, bias=True, block_size=256,
                per_device_train_batch_size=64, max_steps=5000, learning_rate=3e-4, warmup_steps=100,
                eval_steps=500, save_steps=1000, logging_steps=50),
    # nanoGPT's CPU config: a real result in minutes. At 4x128 the unscaled residual init trained best (docs/DESIGN.md)
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, residual_init_power=0.0, dropout=0.0, bias=True, block_size=64,
                per_device_train_batch_size=12, max_steps=2000, learning_rate=1e-3, warmup_steps=100,
                eval_steps=250, save_steps=1000, logging_steps=50),
}
# Settings that make one choice together: a layer that sets either decides both, so a lower layer's value for the
# other does not leak through (naming a sampler turns the contrastive term on over a recipe's "off", and
# "--use_contrastive false" turns it off over a recipe's sampler).
LINKED = ({"use_contrastive", "contrastive_type"},)

DEFAULT, COMMAND_LINE = "default", "command line"


class Setting(NamedTuple):
    value: object
    source: str  # "default", "preset cpu", "recipe ebt_hybrid", "continued <folder>", "resumed <checkpoint>", ...


def merge(layers: list[tuple[str, dict]]) -> dict[str, Setting]:
    """Every setting the layers name, with its value from the last layer that names it (LINKED settings go
    together). `layers`: (source, {name: value}) from lowest to highest."""
    merged: dict[str, Setting] = {}
    for source, values in layers:
        for linked in LINKED:
            if linked & values.keys():
                for name in linked - values.keys():
                    merged.pop(name, None)
        merged.update((name, Setting(value, source)) for name, value in values.items())
    return merged


def values_from(settings: dict[str, Setting], names, skip_sources=()) -> dict:
    """{name: value} of the settings among `names`, leaving out those whose source starts with one of
    `skip_sources`."""
    return {name: s.value for name, s in settings.items()
            if name in names and not any(s.source.startswith(skip) for skip in skip_sources)}


def recorded(settings: dict[str, Setting]) -> dict:
    """The run record's form: {name: {"value": v, "from": source}}, JSON-ready."""
    return {name: {"value": jsonable(s.value), "from": s.source} for name, s in sorted(settings.items())}


def from_record(entries: dict) -> dict:
    """A recorded run's settings as a layer {name: value}."""
    return {name: entry["value"] for name, entry in entries.items()}


def jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return getattr(value, "value", str(value))  # an enum's value, else its text
