"""The Trainer: nanoebm's loss (refined CE, auxiliary System 1 CE, contrastive divergence), its logs, its evaluation
of System 1 and System 2 on fixed validation blocks, and the training state it saves beside each checkpoint.

`run_train.py` is the command line that builds and runs it; the data come from nanoebm.data, the model from
nanoebm.continuing, the contrastive sampler and the replay buffer from nanoebm.contrastive. The losses are documented
in docs/DESIGN.md.
"""

import gc
import json
import math
import os
import time
import weakref
from collections import defaultdict

from functools import partial

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, seed_worker
from transformers.utils import logging

from modeling_nanoebm import NanoEBMForCausalLM
from nanoebm.card import RUN_RECORD
from nanoebm.contrastive import ContrastiveSampler, ThinkingReplay, make_buffers, read_buffers
from nanoebm.corpus import load_bpc_metric
from nanoebm.scoring import TEMPERATURES, calibrated_system1, score_blocks, score_reading

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# The Trainer


class EBMTrainer(Trainer):
    """A Trainer whose loss is nanoebm's: refined CE, auxiliary System 1 CE, and contrastive divergence."""

    def __init__(self, *args, ebm_args, run_record: dict | None = None, reading_ids=None, **kwargs):
        """`ebm_args` are nanoebm's loss options (nanoebm.arguments.LossArguments); `run_record` ({"runs": [...]}, the
        current run last) is written into every checkpoint (nanoebm_run.json), so a resume knows what it continues;
        `reading_ids` (N,): validation text in order, which evaluation also reads with learning while reading."""
        self.ebm, self.run_record, self.reading_ids = ebm_args, run_record, reading_ids
        model, tokenizer = kwargs.get("model"), kwargs.get("processing_class")
        pad = getattr(tokenizer, "pad_token_id", None)
        # the pad id lies outside the model's vocabulary (tokenization_char.py): in memory the configs hold it, so the
        # Trainer's alignment with the tokenizer changes nothing; saved, only the generation config does (generate
        # needs it), because transformers warns on every load of a config.json whose pad id is outside the vocabulary
        self.pad_outside_vocabulary = model is not None and pad is not None and pad >= model.config.vocab_size
        if self.pad_outside_vocabulary:
            model.config.pad_token_id = model.generation_config.pad_token_id = pad
        super().__init__(*args, **kwargs)
        model = self.model
        buffers = make_buffers(self.ebm, model.config.vocab_size, model.config.softmax_temperature,
                               seed=self.args.seed + 1000 * self.args.process_index)
        self.contrastive = next((b for b in buffers if isinstance(b, ContrastiveSampler)), None)
        self.replay = next((b for b in buffers if isinstance(b, ThinkingReplay)), None)
        self._sums, self._counts = defaultdict(float), defaultdict(int)
        self._last_log = (time.perf_counter(), 0)
        self.add_callback(TrainingStateSaver(self))

    # -- data: nanoebm.data's data sets bring their own order and sharding ------------------------------------

    def get_train_dataloader(self):
        """RandomOffsetBlocks orders its windows itself (`order`), in O(1) memory, seeded like the Trainer's own
        sampler; a stream that divides itself between ranks (StreamBlocks: each reads its own rows) is neither
        dispatched from rank 0 nor sharded again by accelerate."""
        if hasattr(self.train_dataset, "order"):
            return self.ordered_dataloader()
        if not getattr(self.train_dataset, "shards_itself", False) or self.args.world_size == 1:
            return super().get_train_dataloader()
        config = self.accelerator.dataloader_config
        dispatch, config.dispatch_batches = config.dispatch_batches, False
        try:
            loader = super().get_train_dataloader()
        finally:
            config.dispatch_batches = dispatch
        loader.dataset.num_processes, loader.dataset.process_index = 1, 0  # accelerate's IterableDatasetShard
        return loader

    def ordered_dataloader(self):
        """The DataLoader the Trainer would build, with the data set's own order as its sampler (accelerate shards
        its batches between processes, and a resume skips the batches already trained on)."""
        args, dataset = self.args, self.train_dataset
        seed = args.data_seed if args.data_seed is not None else args.seed
        workers = args.dataloader_num_workers
        extra = {"prefetch_factor": args.dataloader_prefetch_factor,
                 "persistent_workers": args.dataloader_persistent_workers,
                 "multiprocessing_context": args.dataloader_multiprocessing_context} if workers > 0 else {}
        loader = DataLoader(dataset, batch_size=args.train_batch_size, sampler=dataset.order(seed),
                            collate_fn=self.data_collator, num_workers=workers,
                            pin_memory=args.dataloader_pin_memory, drop_last=args.dataloader_drop_last,
                            worker_init_fn=partial(seed_worker, num_workers=workers, rank=args.process_index),
                            in_order=getattr(args, "dataloader_in_order", True), **extra)  # a flag since 5.10.1
        return self.accelerator.prepare(loader)

    # -- optimiser: nanoGPT's weight-decay grouping, plus alpha with its own learning rate ---------------------

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            decay, no_decay, alpha = [], [], []
            for name, param in model.named_parameters():
                if not param.requires_grad:
                    continue
                if name.endswith("think_lr_raw"):
                    alpha.append(param)
                elif param.dim() >= 2 and not name.endswith(("wte.weight", "wpe.weight")):
                    decay.append(param)
                else:
                    no_decay.append(param)
            groups = [{"params": decay, "weight_decay": self.args.weight_decay},
                      {"params": no_decay, "weight_decay": 0.0}]
            if alpha:
                groups.append({"params": alpha, "weight_decay": 0.0,
                               "lr": self.args.learning_rate * self.ebm.think_lr_lr_multiplier})
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # -- loss ----------------------------------------------------------------------------------------------

    def think_steps_now(self, config):
        if not config.use_thinking or self.state.global_step < self.ebm.warmup_steps_no_refine:
            return 0
        if self.ebm.think_steps_range is None:
            return config.think_steps
        lo, hi = self.ebm.think_steps_range  # the same draw on every rank: seeded by the step
        draw = torch.Generator().manual_seed(self.args.seed * 100003 + self.state.global_step)
        return int(torch.randint(lo, hi + 1, (1,), generator=draw))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        config = self.accelerator.unwrap_model(model).config
        labels = inputs["shift_labels"]
        steps = self.think_steps_now(config)
        # J after the last step costs one more landscape evaluation (a backbone pass for soft tokens): only for
        # the steps whose numbers get logged
        every = self.args.logging_steps
        every = every if every >= 1 else every * self.args.max_steps
        want_trace = not model.training or self.state.global_step % max(1, int(every)) == 0
        input_ids, start, start_mask = inputs["input_ids"], None, None
        replaying = self.replay is not None and model.training and steps > 0
        if replaying:
            input_ids, labels, start, start_mask = self.replay.mix(input_ids, labels)
        try:
            outputs = model(
                input_ids=input_ids, use_thinking=steps > 0, think_steps=steps,
                detach_refine=self.ebm.detach_refine, truncate_refine=self.ebm.truncate_refine,
                detach_system1=self.ebm.detach_system1,
                return_landscape=self.contrastive is not None,
                return_energy_trace=want_trace, think_start=start, think_start_mask=start_mask,
            )
        except FloatingPointError as error:  # the model names the thinking knobs; in training the weights may be it
            raise type(error)(f"{error}. At training step {self.state.global_step} the weights themselves may have "
                              f"diverged: then lower --learning_rate (now {self.args.learning_rate})") from None
        if replaying:
            self.replay.push(input_ids, labels, outputs.logits)
        ce = NanoEBMForCausalLM.next_token_loss
        loss_aux = ce(outputs.system1_logits, shift_labels=labels)
        if steps > 0:
            refined = outputs.step_logits[-1:] if self.ebm.truncate_refine else outputs.step_logits
            per_step = [ce(v, shift_labels=labels) for v in refined]
            loss_main, loss_pred = torch.stack(per_step).mean(), per_step[-1]
            loss = (1 - self.ebm.aux_ce_weight) * loss_main + self.ebm.aux_ce_weight * loss_aux
        else:
            loss_main = loss_pred = loss = loss_aux
        # loss_pred: the CE of the logits decoding would use (v_K, or System 1 when the step did not think)
        logs = {"loss_main": loss_main, "loss_pred": loss_pred, "loss_aux": loss_aux, "think_steps": steps}
        if steps > 0 and want_trace:
            trace = outputs.energy_trace
            logs.update(energy_initial=trace[..., 0].mean(), energy_final=trace[..., -1].mean(),
                        energy_gap=(trace[..., 0] - trace[..., -1]).mean())
        if self.contrastive is not None:
            cd_loss, e_pos, e_neg = self.contrastive.loss(outputs.landscape, outputs.system1_logits, labels)
            loss = loss + self.ebm.contrastive_weight * cd_loss
            logs.update(cd_loss=cd_loss, cd_energy_pos=e_pos, cd_energy_neg=e_neg)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the loss became {loss.item()} at step {self.state.global_step}: lower --learning_rate "
                f"(now {self.args.learning_rate}), --think_lr or --contrastive_weight, or raise "
                f"--contrastive_reg_weight"
            )
        if model.training:
            for key, value in logs.items():
                self._sums[key] += float(value.detach() if torch.is_tensor(value) else value)
                self._counts[key] += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        if "loss" in logs and self._counts:
            extras = torch.tensor([self._sums[k] / self._counts[k] for k in sorted(self._sums)],
                                  device=self.args.device)
            extras = self.accelerator.reduce(extras, reduction="mean")
            logs.update({k: round(float(v), 5) for k, v in zip(sorted(self._sums), extras)})
            # of the prediction's CE: the total loss adds the auxiliary CE and the contrastive term
            logs["perplexity_pred"] = round(math.exp(min(logs["loss_pred"], 50)), 4)
            logs["bits_per_char_pred"] = round(logs["loss_pred"] / math.log(2), 5)
            model = self.accelerator.unwrap_model(self.model)
            logs["alpha"] = round(float(model.think_lr.detach()), 5)
            now, step = time.perf_counter(), self.state.global_step
            elapsed, steps = now - self._last_log[0], step - self._last_log[1]
            if steps > 0 and elapsed > 0:
                tokens = steps * self.args.train_batch_size * self.args.gradient_accumulation_steps \
                    * model.config.block_size * self.args.world_size
                logs["tokens_per_second"] = round(tokens / elapsed, 1)
            self._last_log = (now, step)
            self._sums, self._counts = defaultdict(float), defaultdict(int)
        super().log(logs, start_time)

    # -- evaluation: System 1 and System 2 on fixed validation blocks --------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """System 1, and System 2 at the trained steps and at twice them, on the fixed validation blocks (each process
        scores every world_size-th block): {prefix}_{system1,system2,system2_2x}_{loss,bpc,perplexity}, the energy
        gaps {prefix}_energy_gap(_2x), {prefix}_loss (System 2's where the model thinks), and System 1 calibrated
        beside System 2 on half of the blocks (`calibration_metrics`)."""
        blocks = self.eval_dataset if eval_dataset is None else eval_dataset
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        steps = model.config.think_steps if model.config.use_thinking else 0
        rank, world = self.args.process_index, self.args.world_size
        with self.autocast_smart_context_manager():
            scores = score_blocks(model, blocks[rank::world], self.args.per_device_eval_batch_size,
                                  use_thinking=steps > 0, think_steps=2 * steps, tempered=True)
        means = block_means(scores, steps, self.args.device)
        means["index"] = torch.arange(rank, len(blocks), world, device=self.args.device)
        per_rank = math.ceil(len(blocks) / world)
        gathered = {name: gather_blocks(self.accelerator, values, per_rank) for name, values in means.items()}
        index, tempered = gathered.pop("index"), gathered.pop("system1_tempered")
        metrics = evaluation_metrics(gathered, metric_key_prefix)
        metrics.update(calibration_metrics(tempered, gathered.get("system2"), index % 2 == 0, metric_key_prefix))
        if self.reading_ids is not None and self.reading_ids.numel() > 1:
            with self.autocast_smart_context_manager():
                metrics.update(reading_metrics(model, self.reading_ids, steps, metric_key_prefix))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        model.train(was_training)
        return metrics

    def save_model(self, output_dir=None, *args, **kwargs):
        """The model folder (the Trainer's checkpoints save through here too), without the pad id in config.json
        where it lies outside the vocabulary (__init__ says why)."""
        config = self.accelerator.unwrap_model(self.model).config
        pad = config.pad_token_id
        if self.pad_outside_vocabulary:
            config.pad_token_id = None
        try:
            super().save_model(output_dir, *args, **kwargs)
        finally:
            config.pad_token_id = pad

    # -- the contrastive particles and the replay buffer are training state ----------------------------------

    def _buffers(self):
        return [buffer for buffer in (self.contrastive, self.replay) if buffer is not None]

    def save_training_state(self, folder):
        """Beside a checkpoint the Trainer has just written (TrainingStateSaver): each process's buffers, and the
        run record with the steps done so far."""
        for buffer in self._buffers():
            buffer.save(os.path.join(folder, buffer.FILE.format(self.args.process_index)))
        if self.run_record is not None and self.is_world_process_zero():
            self.run_record["runs"][-1]["steps_done"] = self.state.global_step
            with open(os.path.join(folder, RUN_RECORD), "w") as handle:
                json.dump(self.run_record, handle, indent=1)

    def _read_buffers(self, checkpoint):
        config = self.accelerator.unwrap_model(self.model).config
        return read_buffers(checkpoint, self._buffers(), self.args.process_index, config.block_size, config.vocab_size)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """A resumed run restores the buffers first: their files are checked before the Trainer reads anything, and
        the buffers draw from their own generators, so when they are restored does not matter to the global RNG."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if checkpoint:
            for buffer, state in self._read_buffers(checkpoint):
                buffer.load_state_dict(state)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # -- leaving a distributed run --------------------------------------------------------------------------

    def close_distributed(self):
        """Every rank leaves together and closes its process group, in an order that cannot deadlock.

        A rank that exits while another still writes the model folder can abort in gloo's threads, hence the
        barrier. The group must outlive the DDP wrapper: if the wrapper's reducer holds the group's last reference,
        the group is destroyed with the GIL held and joins gloo's worker threads, one of which may still need the
        GIL to release the barrier's tensors (a hang seen in CI). So the wrapper goes first, then the group, whose
        own destructor releases the GIL. The trainer cannot train or evaluate afterwards."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        self.accelerator.wait_for_everyone()
        wrapper = weakref.ref(self.model_wrapped)
        self.model_wrapped = self.model
        self.accelerator.free_memory()  # the accelerator's references to the wrapper, optimizer and loaders
        gc.collect()
        if wrapper() is None or wrapper() is self.model:  # nothing else holds the reducer: safe to destroy
            dist.destroy_process_group()
        else:
            logger.warning("the DDP wrapper is still referenced elsewhere: the process group is left for the "
                           "interpreter to close at exit")


class TrainingStateSaver(TrainerCallback):
    """Writes the trainer's contrastive and replay state and its run record into each checkpoint, once the Trainer
    has written it (on_save: output_dir/checkpoint-<step>, the Trainer's own layout without a hyperparameter
    search)."""

    def __init__(self, trainer):
        self.trainer = weakref.proxy(trainer)  # the trainer holds its callbacks: no cycle

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        self.trainer.save_training_state(folder)


def block_means(scores: dict, steps: int, device) -> dict:
    """Each block's mean of what evaluation reports (`score_blocks` run with 2 * steps and `tempered`): System 1's NLL,
    System 2's after `steps` and after 2 * steps, the energy gaps J0 - J_steps and J0 - J_2steps, and System 1's NLL at
    each calibration temperature (system1_tempered, (n, G)). A process without blocks sends empty tensors, so every
    process gathers the same names."""
    names = ("system1",) + (("system2", "system2_2x", "energy_gap", "energy_gap_2x") if steps > 0 else ())
    if not scores:
        return {**{name: torch.empty(0, device=device) for name in names},
                "system1_tempered": torch.empty(0, len(TEMPERATURES), device=device)}
    values = {"system1": scores["nll1"]}
    if steps > 0:
        trace = scores["trace"]
        # contiguous: the mean then sums in the same order as over one step's own logits
        values.update(system2=scores["nll_steps"][..., steps - 1].contiguous(), system2_2x=scores["nll2"],
                      energy_gap=trace[..., 0] - trace[..., steps], energy_gap_2x=trace[..., 0] - trace[..., -1])
    values["system1_tempered"] = scores["nll1_tempered"]
    return {name: value.mean(1) for name, value in values.items()}


def evaluation_metrics(gathered: dict, prefix: str) -> dict:
    """The logged numbers from every block's means (`block_means`, gathered): loss (nats), bpc and perplexity of each
    system, each energy gap's mean, and {prefix}_loss, System 2's loss where there is one, else System 1's."""
    metrics = {}
    bpc = load_bpc_metric()
    for name, values in gathered.items():
        if name.startswith("energy_gap"):
            metrics[f"{prefix}_{name}"] = round(float(values.mean()), 5)
            continue
        if torch.isnan(values).any():  # a diverged model: its metrics say so (the metric refuses NaN)
            result = dict.fromkeys(("nats_per_char", "bits_per_char", "perplexity"), math.nan)
        else:  # equal-length blocks: the mean of means is the mean
            result = bpc.compute(nll=values.tolist())
        metrics[f"{prefix}_{name}_loss"] = round(result["nats_per_char"], 5)
        metrics[f"{prefix}_{name}_bpc"] = round(result["bits_per_char"], 5)
        metrics[f"{prefix}_{name}_perplexity"] = round(result["perplexity"], 4)
    metrics[f"{prefix}_loss"] = metrics.get(f"{prefix}_system2_loss", metrics[f"{prefix}_system1_loss"])
    return metrics


def reading_metrics(model, ids, steps: int, prefix: str) -> dict:
    """Validation text read in order, in consecutive windows, with the trained weights ({prefix}_system{1,2}_reading_*)
    and with learning while reading at the model's adapt_* settings ({prefix}_system{1,2}_adapted_*), as loss (nats
    per character) and bpc on the same characters (`score_reading`; System 2 where the model thinks). Reading is
    sequential: every process reads the same text and logs the same numbers."""
    scores = score_reading(model, ids, use_thinking=steps > 0, think_steps=steps)
    metrics = {}
    for name, key in (("system1_reading", "nll1_static"), ("system1_adapted", "nll1_adapted"),
                      ("system2_reading", "nll2_static"), ("system2_adapted", "nll2_adapted")):
        if name.startswith("system2") and steps == 0:
            continue
        loss = float(scores[key].mean())
        metrics[f"{prefix}_{name}_loss"] = round(loss, 5)
        metrics[f"{prefix}_{name}_bpc"] = round(loss / math.log(2), 5)
    return metrics


def calibration_metrics(tempered, system2, fit, prefix: str) -> dict:
    """System 1 against temperature calibration: {prefix}_system1_temperature, fitted on the `fit` blocks (evaluation:
    the even-numbered validation blocks), and on the others System 1 at that temperature
    ({prefix}_system1_calibrated_*), at T = 1 ({prefix}_system1_heldout_*) and System 2 ({prefix}_system2_heldout_*),
    each as loss (nats per character) and bpc. Nothing with fewer than two blocks."""
    result = calibrated_system1(tempered, system2, fit)
    if result is None:
        return {}
    metrics = {f"{prefix}_system1_temperature": round(result["temperature"], 5)}
    for name, key in (("system1_calibrated", "system1_calibrated"), ("system1_heldout", "system1"),
                      ("system2_heldout", "system2")):
        if result[key] is not None:
            metrics[f"{prefix}_{name}_loss"] = round(result[key], 5)
            metrics[f"{prefix}_{name}_bpc"] = round(result[key] / math.log(2), 5)
    return metrics


def gather_blocks(accelerator, values, width):
    """`gather_uneven` of per-block values (n, ...) with any trailing shape, at most `width` blocks per process: every
    process's blocks in process order, (N, ...) on the CPU."""
    shape = values.shape[1:]
    return gather_uneven(accelerator, values.flatten(), width * shape.numel()).view(-1, *shape).cpu()


def gather_uneven(accelerator, values, width):
    """Every process's 1-D `values` (at most `width` each, counts may differ), concatenated in process order.

    Each process pads to `width` and sends a mask of which entries are real along with them, so padding is told
    apart by the mask and never by the value: a NaN the model produced stays in the result."""
    padded = torch.zeros(width, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    real = torch.zeros(width, dtype=torch.uint8, device=values.device)  # uint8: every backend gathers it
    real[: values.numel()] = 1
    padded, real = accelerator.gather(padded), accelerator.gather(real)
    return padded[real.bool()]
