"""The Accelerate loop: batches -> training steps -> optimizer updates, logs, checkpoints, validation."""

from dataclasses import dataclass
from typing import Any

import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from .bookkeeping import _nonfinite_if_asked, all_finite, gather_means, gather_rows
from .checkpoints import StopSignal, save_checkpoint
from .outputs import log_validation
from .step import training_step

logger = get_logger("smpo")


@dataclass
class Run:
    """Everything the loop works with, prepared by :func:`smpo.training.train`."""

    args: Any
    accelerator: Any
    models: Any  # smpo.step.Models
    objective: Any
    noise_source: Any
    loader: Any
    collator: Any
    optimizer: Any
    lr_scheduler: Any
    params: list
    generator: Any  # smpo.checkpoints.StepGenerator
    health: Any  # smpo.bookkeeping.RunHealth
    metrics_log: Any  # smpo.bookkeeping.MetricsLog
    weight_dtype: Any
    work: Any  # smpo.cost.UNetWork: the UNet work of each step


def run_loop(run, global_step, first_epoch, resume_batches):
    """Train from ``global_step`` to --max_train_steps. Returns (global_step, stopping signal or None)."""
    args, accelerator = run.args, run.accelerator
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    stop = StopSignal()
    pending, rows, stopped_by = {}, [], None
    nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)
    run.models.unet.train()
    for epoch in range(first_epoch, args.num_train_epochs):
        run.collator.epoch = epoch
        run.loader.set_epoch(epoch)  # the shuffle order depends on (seed, epoch) only: exact resume
        loader = run.loader
        if epoch == first_epoch and resume_batches:
            loader = accelerator.skip_first_batches(run.loader, resume_batches)
        for batch in loader:
            if not run.health.check_batch(accelerator, batch, epoch):  # stops past --max_bad_pair_fraction
                continue
            run.work.take()  # not counted: UNet calls between steps (validation)
            with accelerator.accumulate(run.models.unet):
                loss, metrics = training_step(args, batch, run.models, run.generator.generator, run.objective,
                                              run.noise_source)
                loss = _nonfinite_if_asked(loss, global_step + 1)
                nonfinite = nonfinite | ~torch.isfinite(loss.detach())  # checked once per update, below
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    skip_update = not all_finite(accelerator, nonfinite)  # then no process steps
                    if not skip_update:
                        accelerator.clip_grad_norm_(run.params, args.max_grad_norm)
                        run.optimizer.step()
                        run.lr_scheduler.step()
                    run.optimizer.zero_grad(set_to_none=True)
            for k, v in metrics.items():
                pending.setdefault(k, []).append(v.detach().float())
            pending.setdefault("unet_work", []).append(torch.tensor(float(run.work.take()[1]), device=accelerator.device))
            rows.extend(batch["rows"].tolist())
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            micro_batches = len(pending["unet_work"])
            logs = gather_means(accelerator, pending)
            logs["unet_work"] = round(logs["unet_work"] * micro_batches * accelerator.num_processes)  # the sum
            logs.update(lr=run.lr_scheduler.get_last_lr()[0], skipped_update=int(skip_update),
                        bad_pairs=run.health.num_bad)
            run.health.after_step(global_step, skip_update)
            run.metrics_log.write(global_step, logs, rows=gather_rows(accelerator, rows))
            pending, rows = {}, []
            nonfinite = torch.zeros_like(nonfinite)
            progress.update(1)
            progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "implicit_acc", "lr")})
            accelerator.log(logs, step=global_step)
            stopped_by = stop.requested(accelerator)
            if global_step % args.checkpointing_steps == 0 or stopped_by:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            if stopped_by:
                break
            if args.run_validation and global_step % args.validation_steps == 0:
                log_validation(args, accelerator, run.models.conditioning, run.models.unet, run.weight_dtype,
                               global_step)
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps or stopped_by:
            break
    stop.restore()
    if global_step == 0 and not stopped_by:
        raise SystemExit("no optimizer step was taken: every batch was unreadable (see the rows logged above)")
    if global_step < args.max_train_steps and not stopped_by:
        logger.warning(f"finished after {global_step} of {args.max_train_steps} steps: batches without a readable "
                       "pair were skipped")
    return global_step, stopped_by
