"""How the experiment runs things: finished-stage markers, subprocesses (the project's scripts, run as a user
would), the training runs' folders and checkpoints, worker pools, and the evaluation of a checkpoint."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np

from .experiment import ROOT
from .family import pipeline_kwargs
from .stats import summarize
from .world import CAPTION, RESOLUTION



# ------------------------------------------------------------------------- cached stages
def write_json(path, obj):
    """Write JSON atomically: into a temporary file renamed over ``path``, so a crash leaves the old file or none."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=list)
    os.replace(tmp, path)


def read_json(path):
    """The JSON in ``path``, or None if it is missing or unreadable (a file an interrupted older version left)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def cached_stage(folder, build, rebuild=False):
    """(record, cached): the record of a finished stage in ``folder``, else build() it from an empty folder.

    ``build()`` writes into ``folder`` and returns a JSON-able record. The DONE marker holds that record and is
    written last and atomically: a folder without a readable DONE is rebuilt from scratch.
    """
    marker = os.path.join(folder, "DONE")
    record = None if rebuild else read_json(marker)
    if isinstance(record, dict):
        return record, True
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    record = build()
    write_json(marker, record)
    return record, False


# --------------------------------------------------------------------------- subprocesses
def python_env(args, threads=None):
    """The environment of the project's scripts: offline, ``threads`` (default --threads) OpenMP threads."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads or args.threads),
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run(cmd, args, log_path, threads=None):
    """Run a command; its output goes to log_path (the progress bars stay on our terminal)."""
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=python_env(args, threads), stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = open(log_path).read()[-4000:]
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- {log_path} ---\n{tail}")


def accelerate_cmd(script="train_smpo_diffusion.py"):
    return [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, script)]


# ---------------------------------------------------------------------- runs and checkpoints
def checkpoint_dirs(run_dir):
    found = {}
    if not os.path.isdir(run_dir):
        return found
    for name in os.listdir(run_dir):
        if name.startswith("checkpoint-") and os.path.exists(os.path.join(run_dir, name, "pytorch_lora_weights.safetensors")):
            found[int(name.split("-")[1])] = os.path.join(run_dir, name)
    return dict(sorted(found.items()))


def run_dir(runs_dir, name, seed):
    return os.path.join(runs_dir, name, f"seed-{seed}")


def claim_runs_dir(runs_dir, base_dir, scored):
    """The runs in ``runs_dir`` are keyed by method and seed only: record which base and data they train on, and
    stop (before a run is overwritten or reused) when an earlier experiment in this folder used others."""
    made_from = {"base": os.path.basename(base_dir), "data": os.path.basename(os.path.dirname(scored))}
    marker = os.path.join(runs_dir, "made_from.json")
    before = read_json(marker)
    if before is not None and before != made_from:
        raise SystemExit(f"{runs_dir} holds runs trained on {before}, this experiment trains on {made_from} (other "
                         "data or base settings): give it its own --work_dir (copy the base-* folder into it to keep "
                         "the cached base), or remove that runs folder.")
    os.makedirs(runs_dir, exist_ok=True)
    write_json(marker, made_from)



def run_record(path):
    """What the experiment keeps of a finished training run: its last logged training metrics, the UNet work it
    counted (smpo.cost: ``unet_work_total`` after each step) and its wall-clock s/step."""
    with open(os.path.join(path, "metrics.jsonl")) as f:
        logged = [m for m in map(json.loads, f) if "step" in m]
    return {"metrics_last": logged[-1], "seconds_per_step": seconds_per_step(path),
            "unet_work_total": {m["step"]: m["unet_work_total"] for m in logged}}


def seconds_per_step(run_path):
    """Training seconds per step between the first and the last checkpoint (start-up excluded).

    Timed by the LoRA weights' files: a checkpoint folder's own time changes when an evaluation caches its result
    there (that made s/step measure the evaluation order).
    """
    steps = checkpoint_dirs(run_path)
    if len(steps) < 2:
        return None
    (first, a), (last, b) = min(steps.items()), max(steps.items())
    written = lambda path: os.path.getmtime(os.path.join(path, "pytorch_lora_weights.safetensors"))  # noqa: E731
    return (written(b) - written(a)) / (last - first)


def parallel(fn, items, jobs, tqdm, desc, unit="run", init=None):
    """fn over items, in order; with jobs > 1 in that many worker processes (evaluation) or threads (runs
    of subprocesses). ``init`` = (initializer, args) runs in each worker (or once here for jobs == 1)."""
    bar = tqdm(total=len(items), desc=desc, unit=unit)
    if jobs <= 1:
        if init:
            init[0](*init[1])
        out = []
        for item in items:
            out.append(fn(item))
            bar.update(1)
    elif init is None:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(fn, item) for item in items]
            for future in futures:
                future.add_done_callback(lambda _: bar.update(1))
            out = [future.result() for future in futures]
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(jobs, initializer=init[0], initargs=init[1]) as pool:
            out = []
            for result in pool.imap(fn, items):
                out.append(result)
                bar.update(1)
    bar.close()
    return out


# ---------------------------------------------------------------------------- evaluation
def load_pipeline(path):
    """The base model's pipeline, of the class its model_index.json names (StableDiffusionPipeline, or
    StableDiffusion3Pipeline without T5 for the flow base), in fp32."""
    import diffusers
    import torch

    from smpo.sampling import saved_without

    pipeline_class = getattr(diffusers, diffusers.DiffusionPipeline.load_config(path)["_class_name"])
    pipe = pipeline_class.from_pretrained(path, dtype=torch.float32, **saved_without(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, cfg, seed, batch=32):
    """num_eval_samples images (n, 32, 32, 3) in [0, 1]; image k starts from the noise of seed + k."""
    import torch

    out = []
    n = cfg["num_eval_samples"]
    with torch.no_grad():
        for start in range(0, n, batch):
            ks = range(start, min(n, start + batch))
            gens = [torch.Generator().manual_seed(seed + k) for k in ks]
            out.append(pipe([CAPTION] * len(gens), height=RESOLUTION, width=RESOLUTION, guidance_scale=1.0,
                            num_inference_steps=cfg["eval_inference_steps"], generator=gens, output_type="np",
                            **pipeline_kwargs(pipe)).images)
    return np.concatenate(out).astype(np.float32)

_EVAL = {}


def init_evaluation(base_dir, cfg, eval_seed, base_images, threads):
    import torch

    torch.set_num_threads(threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    _EVAL.update(pipe=load_pipeline(base_dir), cfg=cfg, eval_seed=eval_seed, base_images=base_images)


def evaluate_checkpoint(job):
    """summarize() of one LoRA checkpoint's samples (in a worker that holds the base pipeline)."""
    name, seed, step, path = job
    cfg = _EVAL["cfg"]
    key = hashlib.sha256(json.dumps([_EVAL["eval_seed"], cfg["num_eval_samples"], cfg["eval_inference_steps"],
                                     os.path.getmtime(os.path.join(path, "pytorch_lora_weights.safetensors"))])
                         .encode()).hexdigest()[:10]
    cached = os.path.join(path, f"toy-eval-{key}.json")  # the same checkpoint and settings: the same numbers
    summary = read_json(cached)
    if summary is not None:
        return summary
    pipe = _EVAL["pipe"]
    pipe.load_lora_weights(path)
    images = sample(pipe, cfg, _EVAL["eval_seed"])
    pipe.unload_lora_weights()
    summary = summarize(images, _EVAL["base_images"])
    write_json(cached, summary)
    return summary


