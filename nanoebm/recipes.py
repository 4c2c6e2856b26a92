"""Named training recipes for the Energy-Based Transformer energy (`landscape="ebt"`): `run_train.py --recipe NAME`
sets these values above the preset and below the command line (nanoebm/settings.py), so any flag given explicitly
wins. Measured in BENCHMARKS.md (`bench/thinking.py`); what each value means is in docs/DESIGN.md.
"""

EBT = dict(landscape="ebt", think_max_move=0.0, entropy_weight=0.0)
# the paper's random start: logits ~ N(0, 1); the extra self-verification samples are i.i.d. draws like the first
RANDOM_START = dict(think_init="random", think_init_noise_std=1.0)

RECIPES = {
    # Gladstone et al. 2025, System 2 training (job_scripts/nlp/pretrain/ebt_s2.sh): alpha 5 fixed, scaled per row
    # and position by U[1/2, 2]; 2 or 3 steps at random (3 at evaluation); Langevin noise 3 on the logits; no detach;
    # the loss on the last step; a replay buffer of 192 blocks making half of each batch; no System 1 loss
    "ebt_system2": {**EBT, **RANDOM_START, "think_lr": 5.0, "think_lr_learnable": False, "think_lr_random_scale": 2.0,
                    "think_steps": 3, "random_think_steps": "2-3", "langevin_noise": 3.0, "truncate_refine": True,
                    "think_replay_prob": 0.5, "think_replay_size": 192, "aux_ce_weight": 0.0,
                    "use_contrastive": False},
    # its System 1 training (ebt_s1.sh): 2 steps, alpha 500 learned at 3 x alpha times the learning rate, the loss
    # at every step, the chain detached between steps
    "ebt_system1": {**EBT, **RANDOM_START, "think_lr": 500.0, "think_lr_learnable": True,
                    "think_lr_lr_multiplier": 1500.0, "think_steps": 2, "detach_refine": True, "aux_ce_weight": 0.0,
                    "use_contrastive": False},
    # nanoebm's hybrid: start from the per-token head's System 1 logits and refine them on the EBT energy, with that
    # head's auxiliary CE and contrastive divergence (the term that pays on the per-token landscapes)
    "ebt_hybrid": {**EBT, "think_init": "base_energy", "think_lr": 5.0, "think_lr_learnable": True, "think_steps": 2,
                   "aux_ce_weight": 0.1, "contrastive_type": "cd"},
}
