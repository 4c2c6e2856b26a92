"""Named training recipes for the Energy-Based Transformer energy (`landscape="ebt"`): `run_train.py --recipe NAME`
puts these flags before the command line's own, so any flag given explicitly wins. Measured in BENCHMARKS.md
(`bench/thinking.py`); what each value means is in docs/DESIGN.md.
"""

from nanoebm.cli import flag_value

EBT = ["--landscape", "ebt", "--think_max_move", "0", "--entropy_weight", "0"]
# the paper's random start: logits ~ N(0, 1); the extra self-verification samples are i.i.d. draws like the first
RANDOM_START = ["--think_init", "random", "--think_init_noise_std", "1.0"]

RECIPES = {
    # Gladstone et al. 2025, System 2 training (job_scripts/nlp/pretrain/ebt_s2.sh): alpha 5 fixed, scaled per row
    # and position by U[1/2, 2]; 2 or 3 steps at random (3 at evaluation); Langevin noise 3 on the logits; no detach;
    # the loss on the last step; a replay buffer of 192 blocks making half of each batch; no System 1 loss
    "ebt_system2": [*EBT, *RANDOM_START, "--think_lr", "5", "--think_lr_learnable", "false",
                    "--think_lr_random_scale", "2", "--think_steps", "3", "--random_think_steps", "2-3",
                    "--langevin_noise", "3.0", "--truncate_refine", "true", "--think_replay_prob", "0.5",
                    "--think_replay_size", "192", "--aux_ce_weight", "0", "--use_contrastive", "false"],
    # its System 1 training (ebt_s1.sh): 2 steps, alpha 500 learned at 3 x alpha times the learning rate, the loss
    # at every step, the chain detached between steps
    "ebt_system1": [*EBT, *RANDOM_START, "--think_lr", "500", "--think_lr_learnable", "true",
                    "--think_lr_lr_multiplier", "1500", "--think_steps", "2", "--detach_refine", "true",
                    "--aux_ce_weight", "0", "--use_contrastive", "false"],
    # nanoebm's hybrid: start from the per-token head's System 1 logits and refine them on the EBT energy, with that
    # head's auxiliary CE and contrastive divergence (the term that pays on the per-token landscapes)
    "ebt_hybrid": [*EBT, "--think_init", "base_energy", "--think_lr", "5", "--think_lr_learnable", "true",
                   "--think_steps", "2", "--aux_ce_weight", "0.1", "--contrastive_type", "cd"],
}


def expand_recipe(argv: list[str]) -> list[str]:
    """argv with the flags of its `--recipe NAME` (or `--recipe=NAME`) put first, so that the command line's own
    flags override them (`--recipe` itself stays: the run records it). Raises ValueError naming the allowed ones."""
    recipe = flag_value(argv, "recipe")
    if recipe is None:
        return argv
    if recipe not in RECIPES:
        raise ValueError(f"--recipe {recipe!r} is unknown: allowed {sorted(RECIPES)}")
    flags = RECIPES[recipe]
    # the contrastive term is one choice made by two flags: the command line's decides it (naming a sampler turns
    # it on over a recipe's "off", and "--use_contrastive false" turns it off over a recipe's sampler)
    for given, dropped in (("--contrastive_type", "--use_contrastive"), ("--use_contrastive", "--contrastive_type")):
        if any(word == given or word.startswith(given + "=") for word in argv):
            flags = [word for i, word in enumerate(flags) if dropped not in flags[max(i - 1, 0): i + 1]]
    return [*flags, *argv]
