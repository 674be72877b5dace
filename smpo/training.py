"""``train()``: set up, run the loop, save. Shared by the SD and SDXL scripts and any copy of them.

A script passes its conditioning class (what is specific to its model family) and, optionally,
the objective and noise source to train with (default: those named by ``--loss_type`` and
``--noise_source`` among the built-in ones). Where each job lives:

    smpo/flags.py          the flags and their checks          smpo/setup.py        models, optimizer
    smpo/objectives.py     --loss_type: smpo, dpo, ...         smpo/inputs.py       data -> DataLoader, caches
    smpo/noise_sources.py  --noise_source: renoise, forward,   smpo/step.py         one training step
                           prior (smpo/prior_noise.py)
    smpo/loop.py           the Accelerate loop                 smpo/bookkeeping.py  health, metrics, summary
    smpo/outputs.py        LoRA / pipeline, model card         smpo/checkpoints.py  save, resume, stop
"""

import logging
import math
import os
import sys

import torch

from .bookkeeping import (MetricsLog, RunHealth, end_processes, replicas_identical, run_context, shared_seed,
                          tracker_config, write_summary)
from .checkpoints import StepGenerator, checkpoint_step, find_checkpoint, register_checkpoint_hooks, \
    remove_partial_checkpoints
from .conditioning import check_pipeline_family
from .cost import UNetWork
from .inputs import cache_text_embeddings, make_dataloader, open_training_pairs
from .loop import Run, run_loop
from .noise_sources import NOISE_SOURCES
from .objectives import OBJECTIVES
from .outputs import log_validation, save_final_model
from .preflight import require, training_needs, unsupported_mixed_precision
from .setup import load_frozen_parts, make_lr_scheduler, make_optimizer, setup_unets
from .step import Models, make_reference

logger = logging.getLogger("smpo")


def train(args, conditioning_class, objective=None, noise_source=None):
    """The whole run: data checked first, then models, the loop, the outputs."""
    objective = objective or OBJECTIVES[args.loss_type]
    noise_source = noise_source or NOISE_SOURCES[args.noise_source]
    require(training_needs(args))  # a missing model, folder or package: stop before anything is loaded or made
    check_pipeline_family(args, conditioning_class, os.path.basename(sys.argv[0]))  # SD3 into the SD script etc.
    if hasattr(conditioning_class, "check_model"):
        conditioning_class.check_model(args)  # the family's own (FLUX: T5 present, resolution packable)
    accelerator = make_accelerator(args)
    seed = shared_seed(args.seed)  # data order and augmentations: the same on every process
    accelerator.dataloader_config.data_seed = seed
    if args.seed is not None:  # 0 is a seed
        from accelerate.utils import set_seed

        set_seed(args.seed, device_specific=True)  # model-side randomness: different on each process
    pairs = open_training_pairs(args, objective, seed)  # bad data fails here, before any model loads
    if noise_source.check is not None:
        noise_source.check(args, pairs)  # e.g. prior: the data must carry each image's noise
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    conditioning, vae, process = load_frozen_parts(args, conditioning_class, accelerator.device, weight_dtype)
    unet, ref_unet = setup_unets(args, accelerator.device, weight_dtype, family=conditioning_class)
    register_checkpoint_hooks(accelerator, args.full_finetune, conditioning.pipeline_class, conditioning.denoiser)
    loader, collator = make_dataloader(args, pairs, objective, seed, accelerator, vae)
    if args.cache_text_embeddings:
        cache_text_embeddings(args, accelerator, conditioning, pairs)
    steps_per_epoch = set_training_length(args, len(loader), accelerator.num_processes)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = make_optimizer(args, params)
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator.num_processes)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    generator = StepGenerator(seed + accelerator.process_index)  # timesteps, noise, VAE samples
    accelerator.register_for_checkpointing(generator)
    health = RunHealth(args, num_pairs=len(loader.dataset))
    accelerator.register_for_checkpointing(health)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers(args.tracker_name, config=tracker_config(args))

    global_step, first_epoch, resume_batches, checkpoint = resume(args, accelerator, steps_per_epoch)
    logger.info(f"loss {args.loss_type}, noise {args.noise_source}, {'full' if args.full_finetune else 'LoRA'}; "
                f"{args.max_train_steps} steps of {args.train_batch_size} pairs x {args.gradient_accumulation_steps} "
                f"accumulation x {accelerator.num_processes} processes; lr {args.learning_rate}")
    metrics_log = MetricsLog(args.output_dir, accelerator, resume_step=global_step if checkpoint else None,
                             context=run_context(args, accelerator, process.context()))
    models = Models(unet, make_reference(unet, ref_unet, conditioning), vae, conditioning, process)
    run = Run(args, accelerator, models, objective, noise_source, loader, collator, optimizer, lr_scheduler, params,
              generator, health, metrics_log, weight_dtype, UNetWork(accelerator.unwrap_model(unet), ref_unet))
    global_step, stopped_by = run_loop(run, global_step, first_epoch, resume_batches)

    accelerator.wait_for_everyone()
    summary = health.summary(accelerator, global_step, pairs.dropped, replicas_identical(accelerator, params))
    if stopped_by:
        logger.warning(f"stopped by signal {stopped_by} after step {global_step}; checkpoint-{global_step} saved. "
                       "Continue with --resume_from_checkpoint latest.")
        end_processes(accelerator, exit_code=128 + stopped_by)
    if accelerator.is_main_process:
        write_summary(args.output_dir, summary)
        save_final_model(args, accelerator, conditioning, unet, pairs.dropped, objective, noise_source)
    if args.run_validation:
        log_validation(args, accelerator, conditioning, unet, weight_dtype, global_step, final=True)
    end_processes(accelerator)


def make_accelerator(args):
    """The Accelerator (seedable sampler: the data order is a function of the seed and the epoch), logging, output dir."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    require([unsupported_mixed_precision(accelerator.mixed_precision, accelerator.device)])
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def set_training_length(args, num_batches, num_processes):
    """Resolve --max_train_steps / --num_train_epochs and --scale_lr; returns the updates per epoch."""
    steps_per_epoch = math.ceil(num_batches / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * num_processes
    return steps_per_epoch


def resume(args, accelerator, steps_per_epoch):
    """(global_step, first_epoch, batches to skip in it, checkpoint or None) after loading --resume_from_checkpoint."""
    if accelerator.is_main_process:
        remove_partial_checkpoints(args.output_dir)
    checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is None:
        return 0, 0, 0, None
    accelerator.print(f"Resuming from {checkpoint}")
    accelerator.load_state(checkpoint)
    global_step = checkpoint_step(checkpoint)
    resume_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
    return global_step, global_step // steps_per_epoch, resume_batches, checkpoint

