"""Run bookkeeping: what went wrong and when to stop, the metrics log, the summary, the end of the run."""

import json
import logging
import os
import sys

import torch
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, gather_object, reduce

from .data import check_bad_pairs

logger = get_logger("smpo")


class RunHealth:
    """Counts what went wrong (unreadable pairs, non-finite losses) and stops the run when it is too much.

    Saved in checkpoints, so the counts survive a resume.
    """

    def __init__(self, args, num_pairs):
        self.num_pairs, self.max_bad_fraction = num_pairs, args.max_bad_pair_fraction
        self.dataset_name = args.dataset_name
        self.max_nonfinite = args.max_nonfinite_steps
        self.bad_rows, self.bad_epochs = [], []  # each pair dropped on this process, and in which epoch
        self.num_bad = 0  # pairs dropped in this epoch by all processes
        self.skipped_steps, self.nonfinite_in_a_row = [], 0

    def check_batch(self, accelerator, batch, epoch):
        """Count the batch's unreadable pairs; stop past --max_bad_pair_fraction. False: skip this batch.

        Counted per epoch (a bad row is met again in the next epoch) and over all processes, so every
        process stops together; when any process's batch has no readable pair, all skip it (a process
        that trained alone would wait for the others' gradients).
        """
        self.bad_rows.extend(batch["bad_rows"])
        self.bad_epochs.extend([epoch] * len(batch["bad_rows"]))
        rows = [r for r, e in zip(self.bad_rows, self.bad_epochs) if e == epoch]
        self.num_bad, unreadable_batches = len(rows), int("captions" not in batch)
        if accelerator.num_processes > 1:
            counts = reduce(torch.tensor([self.num_bad, unreadable_batches], device=accelerator.device), "sum")
            self.num_bad, unreadable_batches = counts.tolist()
        check_bad_pairs(rows, self.num_pairs, self.max_bad_fraction, self.dataset_name, num_bad=self.num_bad)
        if unreadable_batches and accelerator.num_processes > 1:
            logger.warning(f"{unreadable_batches} process(es) got a batch without a readable pair: every process "
                           "skips this batch")
        return not unreadable_batches

    def after_step(self, step, skipped):
        """Count this update; stop the run after too many non-finite losses in a row."""
        if not skipped:
            self.nonfinite_in_a_row = 0
            return
        self.skipped_steps.append(step)
        self.nonfinite_in_a_row += 1
        logger.warning(f"step {step}: non-finite loss, update skipped ({self.nonfinite_in_a_row} in a row)")
        if self.nonfinite_in_a_row >= self.max_nonfinite:
            raise SystemExit(
                f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss (steps "
                f"{self.skipped_steps[-self.nonfinite_in_a_row:]}): stopping. Lower --learning_rate or "
                "--beta_dpo, use bf16 instead of fp16, or resume from an earlier checkpoint.")

    def summary(self, accelerator, steps, dropped, identical):
        bad = sorted({r for rows in gather_object([self.bad_rows]) for r in rows})
        return {"steps": steps, "num_processes": accelerator.num_processes, "replicas_identical": identical,
                "dropped_before_training": dropped, "unreadable_rows": bad, "skipped_nonfinite_steps": self.skipped_steps}

    def state_dict(self):
        return {"bad_rows": self.bad_rows, "bad_epochs": self.bad_epochs, "skipped_steps": self.skipped_steps,
                "nonfinite_in_a_row": self.nonfinite_in_a_row}

    def load_state_dict(self, state):
        self.bad_rows, self.skipped_steps = list(state["bad_rows"]), list(state["skipped_steps"])
        self.bad_epochs = list(state.get("bad_epochs", [-1] * len(self.bad_rows)))  # older checkpoints: no epochs
        self.nonfinite_in_a_row = state["nonfinite_in_a_row"]


def shared_seed(seed):
    """--seed, or one random seed drawn by the main process and shared with the others."""
    if seed is not None:
        return seed
    return broadcast_object_list([int(torch.randint(0, 2**31 - 1, ()).item())])[0]


def all_finite(accelerator, nonfinite):
    """False when any process saw a non-finite loss in this update (all skip together)."""
    flag = nonfinite.float().reshape(1)
    if accelerator.num_processes > 1:
        flag = reduce(flag, reduction="sum")
    return not bool(flag.max() > 0)


def gather_means(accelerator, pending):
    """Each metric averaged over the update's micro-batches and the processes: one gather, one sync."""
    names = sorted(pending)
    means = torch.stack([torch.stack(pending[k]).mean() for k in names])
    return dict(zip(names, accelerator.gather(means.reshape(1, -1)).mean(0).tolist()))


def _nonfinite_if_asked(loss, step):
    """Test hook: SMPO_TEST_NAN_LOSS_AT_STEPS=2,3 makes the loss NaN at those optimizer steps."""
    steps = os.environ.get("SMPO_TEST_NAN_LOSS_AT_STEPS")
    if steps and str(step) in steps.split(","):
        return loss * float("nan")
    return loss


def gather_rows(accelerator, rows):
    if accelerator.num_processes == 1:
        return list(rows)
    return [r for part in gather_object([list(rows)]) for r in part]


def replicas_identical(accelerator, params):
    """Whether every process ends with the same trained parameters (always True on one process)."""
    if accelerator.num_processes == 1:
        return True
    checksum = torch.stack([p.detach().double().sum() for p in params] + [p.detach().double().abs().sum() for p in params])
    gathered = accelerator.gather(checksum.reshape(1, -1))
    return bool((gathered == gathered[0]).all())


def write_summary(output_dir, summary):
    """OUTPUT_DIR/train_summary.json: steps, what was dropped and why (by row), skipped steps."""
    with open(os.path.join(output_dir, "train_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


class MetricsLog:
    """OUTPUT_DIR/metrics.jsonl: a first line ``{"context": {...}}`` (the method and its settings), then one
    JSON line per optimizer step with its metrics and the rows trained on.

    On resume, lines after the checkpoint's step (from the interrupted run) are dropped. A step's ``unet_work``
    (smpo.cost) is added up into ``unet_work_total``, continued from the kept lines on resume.
    """

    def __init__(self, output_dir, accelerator, resume_step=None, context=None):
        self.path = os.path.join(output_dir, "metrics.jsonl") if accelerator.is_main_process else None
        self.work_total = 0
        if not self.path:
            return
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if json.loads(line).get("step", 0) <= resume_step]
        if not kept:
            kept = [json.dumps({"context": context}) + "\n"]
        self.work_total = ([0] + [line.get("unet_work_total", 0) for line in map(json.loads, kept)])[-1]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def write(self, step, logs, rows):
        if "unet_work" in logs:
            self.work_total += logs["unet_work"]
            logs = {**logs, "unet_work_total": self.work_total}
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **logs, "rows": rows}) + "\n")


def run_context(args, accelerator, process_context):
    """What a metrics.jsonl reader needs to know about the run: the method, its noise and its scale."""
    keys = ("loss_type", "noise_source", "num_inversion_steps", "num_renoise_steps", "inversion_schedule",
            "inversion_model", "beta_dpo", "learning_rate", "train_batch_size", "gradient_accumulation_steps",
            "drop_human_ties", "full_finetune", "seed")
    return {**{k: getattr(args, k) for k in keys}, **process_context, "num_processes": accelerator.num_processes}


def tracker_config(args):
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}


def end_processes(state, exit_code=0):
    """Every process waits for the others (the main one may still be saving), then the run ends.

    ``state``: the run's Accelerator (its trackers are ended too) or a PartialState (generate_pairs.py).
    ``exit_code``: a number, or a message to exit with (status 1).

    Several CPU processes (gloo) leave with ``os._exit`` once everything is written: torch's gloo
    process group can deadlock when Python frees it at exit (its destructor joins its worker threads
    while holding the GIL that one of them needs to free a finished collective's tensor; seen with
    torchrun on 2 CPU processes in CI).
    """
    state.wait_for_everyone()
    gloo = state.num_processes > 1 and torch.distributed.get_backend() == "gloo"
    if hasattr(state, "end_training"):
        state.end_training()
    if gloo:
        if isinstance(exit_code, str):
            print(exit_code, file=sys.stderr)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code if isinstance(exit_code, int) else 1)
    if exit_code:
        raise SystemExit(exit_code)
