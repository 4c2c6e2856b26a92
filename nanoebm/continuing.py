"""The model a run trains: a new one from the flags, or a saved one continued with this run's flags.

Continuing keeps what the saved weights are shaped and trained for (KEPT_ON_CONTINUE: a different value is refused
with the reason) and takes every other option (THINKING_FIELDS); a resumed run also keeps the step size, which the
checkpoint's optimizer restores. `run_train.py` calls `saved_tokenizer` (which settles the data's block size: a
continued model's own) before it reads the data, and `build_model` before the Trainer exists.
"""

import torch

from configuration_nanoebm import OPTIONS, NanoEBMConfig
from modeling_nanoebm import NanoEBMForCausalLM, inverse_softplus
from nanoebm.cli import UsageError
from nanoebm.folders import check_model_folder, loading

STEP_SIZE_FIELDS = ("think_lr", "think_lr_learnable")
# What continuing a saved model (--model_name_or_path) keeps, and why a different value is refused (each option's own
# `kept`, configuration_nanoebm.OPTIONS); every other model option takes effect
KEPT_ON_CONTINUE = {option.name: option.kept for option in OPTIONS if option.kept and option.name != "vocab_size"}
THINKING_FIELDS = tuple(option.name for option in OPTIONS if not option.kept)


def load_weights(path):
    """NanoEBMForCausalLM from a saved folder, to continue training it; a bad folder is one UsageError."""
    folder, _, weights = check_model_folder(path)
    with loading(folder, weights):
        model = NanoEBMForCausalLM.from_pretrained(folder)
    return in_own_memory(model)


def in_own_memory(model):
    """The model with every parameter and buffer copied into memory of its own. Loaded, they are views into the
    safetensors file's mapping, at addresses that are not 64-byte aligned, where the CPU's matrix products (MKL) take
    another path and round differently than on a fresh model's memory: a resumed run would drift from the run it
    repeats (by 2e-5 in 100 steps of a 2x64 fast_pcd run)."""
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.data = tensor.data.clone()
    return model


def build_model(folder, model_args, tokenizer, resuming=False):
    """A new model from the flags (`folder` None), or the saved one in `folder` with this run's flags: checked against
    its config before its weights are read, then set (`continued`)."""
    overrides = {option.name: getattr(model_args, option.name) for option in OPTIONS
                 if option.name not in ("vocab_size", "block_size") and getattr(model_args, option.name) is not None}
    if folder:
        folder, _, _ = check_model_folder(folder)
        with loading(folder):
            saved = NanoEBMConfig.from_pretrained(folder)
        check_continuation(saved, overrides, resuming)
        return continued(load_weights(folder), overrides, resuming)
    config = NanoEBMConfig(vocab_size=tokenizer.vocab_size, block_size=model_args.block_size, **overrides)
    return NanoEBMForCausalLM(config)


def check_kept(name, value, saved):
    """UsageError when a flag would change what a continued model keeps (KEPT_ON_CONTINUE)."""
    if value != saved:
        raise UsageError(f"--{name} {value} differs from the saved model's {name}={saved!r}: {KEPT_ON_CONTINUE[name]}; "
                         f"drop the flag to continue that model, or train a new one")


def check_continuation(config, overrides: dict, resuming: bool):
    """UsageError for a flag the saved model (its `config`, which this changes) cannot take: another value of what it
    keeps, a combination the config refuses, or, resuming, another step size (a resume restores the checkpoint's
    weights and optimizer after the model is built)."""
    for key, value in overrides.items():
        saved = getattr(config, key)
        if key in KEPT_ON_CONTINUE and key not in getattr(config, "assumed", ()):  # an assumed value may be corrected
            check_kept(key, value, saved)
            continue
        if resuming and key in STEP_SIZE_FIELDS and value != saved:
            raise UsageError(f"--{key} {value} differs from the checkpoint's {saved!r}: a resume restores the "
                             f"checkpoint's step size and optimizer; to change it, continue the checkpoint as a new "
                             f"run (--model_name_or_path CHECKPOINT)")
        setattr(config, key, value)
    config.validate_nanoebm()


def continued(model, overrides: dict, resuming: bool):
    """The saved model with this run's thinking flags: on its config, which forward reads, and the step size also
    in its weights."""
    for key, value in overrides.items():
        if key not in KEPT_ON_CONTINUE or key in getattr(model.config, "assumed", ()):
            setattr(model.config, key, value)
    if not resuming and overrides.keys() & set(STEP_SIZE_FIELDS):
        set_step_size(model, reset="think_lr" in overrides)
    return model


def set_step_size(model, reset: bool):
    """alpha = softplus(think_lr_raw) lives in the weights, where the config's think_lr is only its start: `reset`
    puts config.think_lr there (--think_lr), and think_lr_learnable makes it a Parameter (trained) or a buffer
    (fixed, still saved), as a new model would have it."""
    raw = torch.tensor(inverse_softplus(model.config.think_lr)) if reset else model.think_lr_raw.detach().clone()
    del model.think_lr_raw
    if model.config.think_lr_learnable:
        model.think_lr_raw = torch.nn.Parameter(raw)
    else:
        model.register_buffer("think_lr_raw", raw)


def saved_tokenizer(args):
    """A continued model's tokenizer (None for a new model), with the data's block size settled: a continued model's
    own, else the preset's."""
    from tokenization_char import CharTokenizer

    start, model_args = args.start, args.model
    if not start.model_name_or_path:
        return None
    folder, saved, _ = check_model_folder(start.model_name_or_path)
    start.model_name_or_path = str(folder)  # `~` expanded: the tokenizer and the record read it as a path
    block = saved.get("block_size")
    if not isinstance(block, int) or block < 1:
        raise UsageError(f"{folder / 'config.json'} has block_size={block!r}: a saved nanoebm model has a positive "
                         f"integer there; save the model again with save_pretrained")
    if model_args.block_size is not None:
        check_kept("block_size", model_args.block_size, block)
    model_args.block_size = block
    if args.resume_from is not None:  # before the weights load: a refused state file is all this run prints
        from nanoebm.contrastive import check_resume_state

        check_resume_state(args.resume_from, args.loss, saved, args.training.process_index)
    return CharTokenizer.from_pretrained(start.model_name_or_path)
