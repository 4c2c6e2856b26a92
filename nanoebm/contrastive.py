"""Contrastive divergence on the logits and the replay buffer of refined logits, with their saved state.

Both keep state across training steps (particles, stored blocks, their own random generators). That state is part of
a checkpoint: `save` / `read` write and check its files, `read_buffers` / `check_resume_state` refuse a checkpoint
whose files this run cannot use before anything is loaded. The Trainer (nanoebm.trainer) draws its negatives and
replayed rows from here; the losses are documented in docs/DESIGN.md.
"""

import math
import os

import torch

from nanoebm.state import REDO as STATE_REDO, StateFileError, generator_state_spec, load_state, save_state


# ----------------------------------------------------------------------------------------------------------------
# Contrastive divergence on the logits


class ContrastiveSampler:
    """Negatives for contrastive divergence: Langevin chains on the logits over the batch's detached landscape.

    cd starts chains at the System 1 logits of every position. pcd keeps `n_persistent` particles that move to a
    random set of positions each step and persist (Tieleman 2008). fast_pcd keeps `n_chains` chains that restart
    from the System 1 logits with probability `restart_prob` (persistent chains with restarts; not Tieleman &
    Hinton's fast weights). The particles and the sampler's random generator are training state, saved in each
    checkpoint (`save`, `read`).
    """

    FILE = "contrastive_state_{}.safetensors"  # {}: the process index

    def __init__(self, args, vocab_size: int, temperature: float, seed: int):
        self.args, self.temperature = args, temperature
        self.generator = torch.Generator().manual_seed(seed)
        self.particles = None
        if args.contrastive_type in ("pcd", "fast_pcd"):
            n = args.n_persistent if args.contrastive_type == "pcd" else args.n_chains
            self.particles = args.buffer_init_std * torch.randn(n, vocab_size, generator=self.generator)

    def state_dict(self):
        return {"particles": self.particles, "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.particles = state["particles"]
        self.generator.set_state(state["generator"])

    def save(self, path):
        save_state(path, "contrastive", self.state_dict(), {})

    def read(self, path, block_size: int, vocab_size: int):
        """The state in `path`, checked: this run's particle count and vocabulary (StateFileError otherwise)."""
        spec = {"generator": generator_state_spec()}
        if self.particles is not None:
            spec["particles"] = (torch.float32, (self.particles.shape[0], "V"))
        return {"particles": None, **load_state(path, "contrastive", spec, (), sizes={"V": vocab_size})}

    def randn(self, shape, device):
        return torch.randn(shape, generator=self.generator).to(device)

    @torch.no_grad()
    def langevin(self, landscape, logits, first_energy=None):
        """`first_energy`: the landscape at the start, when the caller has it already (cd starts every chain at the
        System 1 belief, where the positive energy is evaluated anyway)."""
        step, scale, tau = self.args.langevin_step_size, self.args.langevin_noise_scale, self.temperature
        for k in range(self.args.contrastive_k):
            p = torch.softmax(logits / tau, dim=-1)
            energy = first_energy if k == 0 and first_energy is not None else landscape(p)
            grad = p * (energy - (p * energy).sum(-1, keepdim=True)) / tau
            logits = logits - step * grad + math.sqrt(2 * step * scale) * self.randn(logits.shape, logits.device)
        return logits

    def loss(self, landscape, system1_logits, labels):
        """Returns (loss, E_pos, E_neg) averaged over the positions that carry a chain."""
        B, T, V = system1_logits.shape
        start = system1_logits.detach().float().clone()
        valid = (labels != -100).flatten()
        if self.particles is None:  # cd: every position
            chosen = valid.nonzero().squeeze(1)
        else:
            candidates = valid.nonzero().squeeze(1)
            n = min(self.particles.shape[0], candidates.numel())
            chosen = candidates[torch.randperm(candidates.numel(), generator=self.generator)[:n]]
            particles = self.particles[:n].to(start.device)
            if self.args.contrastive_type == "fast_pcd":
                restart = (torch.rand(n, generator=self.generator) < self.args.restart_prob).to(start.device)
                particles = torch.where(restart[:, None], start.view(-1, V)[chosen], particles)
            start.view(-1, V)[chosen] = particles
        # live landscape: gradients reach the model through the energies, never through the sampled beliefs
        tau = self.temperature
        p_data = torch.softmax(system1_logits.detach().float() / tau, -1)
        energy_data = landscape(p_data)
        # cd's chains start at p_data itself: their first Langevin step reads the same energies
        negatives = self.langevin(landscape, start, energy_data.detach() if self.particles is None else None)
        if self.particles is not None:
            n = chosen.numel()
            self.particles[:n] = negatives.view(-1, V)[chosen].cpu()
        e_pos = energy_data.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1).flatten()[chosen]
        p_neg = torch.softmax(negatives / tau, -1)
        e_neg = (p_neg * landscape(p_neg)).sum(-1).flatten()[chosen]
        loss = (e_pos - e_neg).mean() + self.args.contrastive_reg_weight * (e_pos.pow(2) + e_neg.pow(2)).mean()
        return loss, e_pos.mean().detach(), e_neg.mean().detach()


# ----------------------------------------------------------------------------------------------------------------
# Replay buffer of refined logits (Energy-Based Transformers)


class ThinkingReplay:
    """Blocks seen earlier, kept with the logits thinking refined them to. A replayed row resumes its descent from
    there, so training sees the landscape where a longer chain of steps would go (at the cost of fresh rows)."""

    FILE = "replay_state_{}.safetensors"  # {}: the process index

    def __init__(self, size: int, prob: float, seed: int):
        self.size, self.prob = size, prob
        self.generator = torch.Generator().manual_seed(seed)
        self.ids = self.labels = self.logits = None
        self.count, self.cursor = 0, 0

    def state_dict(self):
        return {"ids": self.ids, "labels": self.labels, "logits": self.logits, "count": self.count,
                "cursor": self.cursor, "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.ids, self.labels, self.logits = state["ids"], state["labels"], state["logits"]
        self.count, self.cursor = state["count"], state["cursor"]
        self.generator.set_state(state["generator"])

    def save(self, path):
        state = self.state_dict()
        save_state(path, "replay", {k: state[k] for k in ("ids", "labels", "logits", "generator")},
                   {"count": self.count, "cursor": self.cursor})

    def read(self, path, block_size: int, vocab_size: int):
        """The state in `path`, checked: this buffer's size, the block size and the vocabulary."""
        spec = {"ids": (torch.long, (self.size, "T")), "labels": (torch.long, (self.size, "T")),
                "logits": (torch.float32, (self.size, "T", "V")), "generator": generator_state_spec()}
        state = load_state(path, "replay", spec, ("count", "cursor"), optional=("ids", "labels", "logits"),
                           sizes={"T": block_size, "V": vocab_size})
        stored = 0 if state["ids"] is None else self.size
        if not (0 <= state["count"] <= stored and 0 <= state["cursor"] < self.size):
            raise StateFileError(f"{path} cannot be resumed from: count={state['count']}, cursor={state['cursor']} "
                                 f"do not fit a buffer of {self.size} blocks; {STATE_REDO}")
        return state

    def mix(self, input_ids, labels):
        """Replace some rows by replayed blocks: (input_ids, labels, start logits or None, row mask or None)."""
        B = input_ids.shape[0]
        rows = torch.rand(B, generator=self.generator) < self.prob
        if self.count == 0 or not rows.any():
            return input_ids, labels, None, None
        picks = torch.randint(self.count, (int(rows.sum()),), generator=self.generator)
        device = input_ids.device
        rows_d = rows.to(device)
        input_ids, labels = input_ids.clone(), labels.clone()
        input_ids[rows_d] = self.ids[picks].to(device)
        labels[rows_d] = self.labels[picks].to(device)
        start = torch.zeros(*input_ids.shape, self.logits.shape[-1], device=device)
        start[rows_d] = self.logits[picks].to(device).float()
        return input_ids, labels, start, rows_d[:, None].expand(input_ids.shape)

    @torch.no_grad()
    def push(self, input_ids, labels, refined):
        if self.ids is None:
            self.ids = torch.zeros(self.size, input_ids.shape[1], dtype=torch.long)
            self.labels = torch.zeros_like(self.ids)
            self.logits = torch.zeros(self.size, *refined.shape[1:])
        slots = (self.cursor + torch.arange(input_ids.shape[0])) % self.size  # a ring: the oldest go first
        self.ids[slots], self.labels[slots] = input_ids.cpu(), labels.cpu()
        self.logits[slots] = refined.detach().float().cpu()
        self.cursor = int(slots[-1] + 1) % self.size
        self.count = min(self.count + input_ids.shape[0], self.size)


def make_buffers(ebm_args, vocab_size: int, temperature: float, seed: int) -> list:
    """The contrastive sampler and the replay buffer these loss options keep (those that are on)."""
    buffers = [ContrastiveSampler(ebm_args, vocab_size, temperature, seed)] if ebm_args.use_contrastive else []
    if ebm_args.think_replay_prob > 0:
        buffers.append(ThinkingReplay(ebm_args.think_replay_size, ebm_args.think_replay_prob, seed + 7))
    return buffers


def read_buffers(checkpoint, buffers, rank: int, block_size: int, vocab_size: int) -> list:
    """[(buffer, its state in `checkpoint`)], each file checked first (StateFileError otherwise).

    Never unpickles: an older nanoebm's .pt state files are refused, not read."""
    states = []
    for buffer in buffers:
        path = os.path.join(checkpoint, buffer.FILE.format(rank))
        if not os.path.isfile(path):
            old = os.path.splitext(path)[0] + ".pt"
            if os.path.isfile(old):
                raise StateFileError(f"{old} is an older nanoebm's pickled training state, which nanoebm no longer "
                                     f"loads (unpickling a file can run code); {STATE_REDO}")
            kind = "contrastive" if isinstance(buffer, ContrastiveSampler) else "replay-buffer"
            raise StateFileError(f"{path} is missing: this checkpoint was not saved by a {kind} run with the same "
                                 f"number of processes; {STATE_REDO}")
        states.append((buffer, buffer.read(path, block_size, vocab_size)))
    return states


def check_resume_state(checkpoint, ebm_args, config: dict, rank: int) -> None:
    """Before a resumed run loads anything: refuse a checkpoint whose training-state files this run cannot use.

    `config` is the checkpoint's config.json. The Trainer reads the same files again when it restores them."""
    vocab_size, block_size = config.get("vocab_size"), config.get("block_size")
    if not isinstance(vocab_size, int) or not isinstance(block_size, int):
        return  # not a model folder: loading it says so
    read_buffers(checkpoint, make_buffers(ebm_args, vocab_size, 1.0, seed=0), rank, block_size, vocab_size)
