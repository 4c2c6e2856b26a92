#!/usr/bin/env python
"""Peak memory of one training step (forward and backward, thinking on) with and without activation checkpointing.

    python bench/grad_checkpoint.py --threads 1

For each landscape the same model, batch and random state run one step as the Trainer does (`model(ids,
shift_labels=ids).loss.backward()`), once plain and once after `model.activation_checkpointing_enable()`; the losses
must agree. Memory, not time, is measured, so a busy machine does not change the figures:
- on CUDA, torch.cuda.max_memory_allocated over the step;
- on CPU, the peak of live tensor bytes in torch's memory profiler timeline (every tensor's allocation and release:
  weights, activations, gradients), and that peak less what was live when the step began (the weights).
"""

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.profiler._memory_profiler import Action  # noqa: E402

from configuration_nanoebm import LANDSCAPES, NanoEBMConfig  # noqa: E402
from modeling_nanoebm import NanoEBMForCausalLM  # noqa: E402

SETTINGS = {  # beyond a landscape's defaults, where it is trained otherwise
    "ebt": dict(think_max_move=0.0, entropy_weight=0.0, think_lr=5.0),  # as its recipes: second order in training
}


def landscape_settings(name):
    """The config values of landscape `name` (every registered one is measured): an open correction gate where it
    may start open makes the belief-dependent terms real, as after training."""
    gate = dict(correction_scale_init=0.5) if LANDSCAPES[name].opens_gate else {}
    return dict(landscape=name, **gate, **SETTINGS.get(name, {}))


def one_step(model, ids):
    loss = model(ids, shift_labels=ids).loss
    loss.backward()
    return loss.item()


def cuda_peak(model, ids):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    loss = one_step(model, ids)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return loss, peak, peak - start


def cpu_peak(model, ids):
    """Peak of live tensor bytes, from the memory profiler's timeline of allocations and releases."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        loss = one_step(model, ids)
    live = start = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action in (Action.PREEXISTING, Action.CREATE):
            live += size
        elif action == Action.DESTROY:
            live -= size
        if action == Action.PREEXISTING:
            start = live
        peak = max(peak, live)
    return loss, peak, peak - start


def measure(args, name, checkpointing, device):
    torch.manual_seed(0)
    config = NanoEBMConfig(vocab_size=65, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                           n_embd=args.n_embd, dropout=args.dropout, think_steps=args.think_steps,
                           **landscape_settings(name))
    model = NanoEBMForCausalLM(config).to(device).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    ids = torch.randint(0, 65, (args.batch_size, args.block_size), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the same dropout masks in both runs
    return (cuda_peak if device.type == "cuda" else cpu_peak)(model, ids.to(device))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--landscapes", nargs="+", default=list(LANDSCAPES), choices=list(LANDSCAPES))
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--n_head", type=int, default=6)
    parser.add_argument("--n_embd", type=int, default=384)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--think_steps", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"python bench/grad_checkpoint.py {shlex.join(sys.argv[1:])}")
    print(f"{args.n_layer}x{args.n_embd}, {args.n_head} heads, block {args.block_size}, batch {args.batch_size}, "
          f"think_steps {args.think_steps}, dropout {args.dropout}, {device.type}, torch {torch.__version__}")
    print(f"{'landscape':<12} {'peak MiB':>9} {'with ckpt':>10} {'step MiB':>9} {'with ckpt':>10} {'ratio':>6}  loss")
    mib = 2 ** -20
    for name in args.landscapes:
        loss, peak, step = measure(args, name, False, device)
        kept_loss, kept_peak, kept_step = measure(args, name, True, device)
        if abs(kept_loss - loss) > 1e-5 * abs(loss):
            raise SystemExit(f"{name}: the checkpointed loss {kept_loss} differs from the plain one {loss}")
        print(f"{name:<12} {peak * mib:>9.1f} {kept_peak * mib:>10.1f} {step * mib:>9.1f} {kept_step * mib:>10.1f} "
              f"{kept_step / step:>6.2f}  {loss:.4f}")
    print("peak: the most tensor memory live during the step; step: that peak less what was live before it (the "
          "weights); ratio: step with checkpointing / without")


if __name__ == "__main__":
    main()
