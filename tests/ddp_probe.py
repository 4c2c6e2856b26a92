"""Run by tests/test_train.py under `accelerate launch`: trains through run_train.main and records, per rank,
the first batch this rank's data loader yields and a fingerprint of the final weights."""

import faulthandler
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import run_train  # noqa: E402


def fingerprint(tensor):
    return hashlib.sha1(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class Probe(TrainerCallback):
    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.first_batch = fingerprint(next(iter(train_dataloader))["input_ids"])

    def on_train_end(self, args, state, control, model=None, **kwargs):
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        record = dict(rank=args.process_index, world=args.world_size, first_batch=self.first_batch,
                      weights=fingerprint(weights), steps=state.global_step)
        with open(os.path.join(args.output_dir, f"probe_rank{args.process_index}.json"), "w") as handle:
            json.dump(record, handle)


if __name__ == "__main__":
    faulthandler.dump_traceback_later(420, exit=True)  # a hang prints every thread's stack and fails the test
    run_train.main(sys.argv[1:], callbacks=[Probe()])
    import torch.distributed as dist

    output_dir = sys.argv[sys.argv.index("--output_dir") + 1]
    with open(os.path.join(output_dir, f"closed_rank{os.environ['RANK']}.json"), "w") as handle:
        json.dump({"process_group_closed": not dist.is_initialized()}, handle)
