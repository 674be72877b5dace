#!/usr/bin/env python
"""SmPO's optimizer-step cost next to Diffusion-DPO's, measured side by side in one process.

    python benchmarks/step_cost.py --quick                       # tiny SD model on the CPU (~3 min)
    python benchmarks/step_cost.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --resolution 512 --mixed_precision fp16 --use_8bit_adam --gradient_checkpointing   # on a GPU

Runs the training step of smpo.step (the same code the scripts run, set up by smpo.setup) for three configurations
on the same model, batch and data, after warm-up, interleaving them round by round so machine
noise hits all three alike:

    smpo          --loss_type smpo --noise_source renoise (K inversion steps, R renoise steps)
    smpo-forward  --loss_type smpo --noise_source forward
    dpo           --loss_type dpo  --noise_source forward   (Diffusion-DPO)

and prints seconds per optimizer step, UNet image-forwards per step (counted by a hook: a call on n
images counts n), peak memory (CUDA max_memory_allocated, or on the CPU the peak growth of the C heap
in use during the step, sampled with glibc's mallinfo2), each as a ratio to DPO, and the floor ratio
implied by the forward count: DPO costs 4 UNet units per image (policy forward + backward ~3,
reference forward 1) and each no-grad inversion image-forward adds 1, so
floor = (4 + inversion image-forwards per image) / 4.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {"smpo": ("smpo", "renoise"), "smpo-forward": ("smpo", "forward"), "dpo": ("dpo", "forward")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny assets built on the fly, CPU, few steps")
    p.add_argument("--assets", default=None, help="with --quick: reuse this examples/make_tiny_assets.py output")
    p.add_argument("--pretrained_model_name_or_path", default=None)
    p.add_argument("--sdxl", action="store_true", help="use the SDXL script's conditioning")
    p.add_argument("--dataset_name", default=None, help="a scored preference dataset (default: the tiny one)")
    p.add_argument("--resolution", type=int, default=96,
                   help="default 96, chosen for --quick (pass your model's size otherwise): at 32 px the tiny model's "
                        "per-call overhead (~2 images of work) hides the image-forward cost that a GPU's time follows, "
                        "and at 64 px it still adds 3-10%%")
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--num_inversion_steps", type=int, default=5)
    p.add_argument("--inversion_schedule", default="exact", choices=["exact", "grid_above", "grid_below"])
    p.add_argument("--num_renoise_steps", type=int, default=1)
    p.add_argument("--full_finetune", action="store_true")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--use_8bit_adam", action="store_true")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--warmup_steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="measured steps per configuration (default 20; 8 --quick)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --quick, else torch's). With 2 threads the tiny model's "
                        "small inversion calls (one image each as samples finish) pay the threads' hand-off on every "
                        "call, a CPU artefact that is not the image-forward cost the ratio is about.")
    return p.parse_args(argv)


class PeakHeap:
    """Peak growth of the bytes this process has allocated on the C heap (glibc mallinfo2, sampled
    in a thread), over the baseline at entry: the CPU stand-in for CUDA's max_memory_allocated."""

    def __init__(self, interval=0.0005):
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in
                        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                         "fordblks", "keepcost")]

        self._libc = ctypes.CDLL("libc.so.6")
        self._libc.mallinfo2.restype = MallInfo2
        self.interval, self.running = interval, False

    def in_use(self):
        info = self._libc.mallinfo2()
        return info.uordblks + info.hblkhd  # small blocks in use + mmap-ed large blocks

    def __enter__(self):
        self.base = self.peak = self.in_use()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.in_use())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.in_use())
        self.growth = self.peak - self.base


class Setup:
    """One configuration: its own LoRA (or full) UNet and optimizer on shared frozen parts."""

    def __init__(self, name, args, script, conditioning, vae, schedule, batch):
        from smpo.setup import make_optimizer, setup_unets
        from smpo.step import Models, make_reference

        loss_type, noise_source = CONFIGS[name]
        self.args = script.parse_args(self.flags(args, loss_type, noise_source))
        self.objective, self.noise_source = script.OBJECTIVES[loss_type], script.NOISE_SOURCES[noise_source]
        unet, reference_unet = setup_unets(self.args, args.device, self.weight_dtype(args))
        self.unet, self.name, self.batch = unet, name, batch
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.args, self.params)
        self.models = Models(unet, make_reference(unet, reference_unet), vae, conditioning, schedule)
        self.generator = torch.Generator().manual_seed(args.seed)  # on the host, as in training
        self.calls = 0
        unet.register_forward_pre_hook(lambda _, inputs: setattr(self, "calls", self.calls + inputs[0].shape[0]))
        self.autocast = torch.autocast(args.device.split(":")[0], dtype=self.weight_dtype(args),
                                       enabled=args.mixed_precision != "no")
        self.times, self.call_counts, self.memory = [], [], 0

    @staticmethod
    def weight_dtype(args):
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)

    @staticmethod
    def flags(args, loss_type, noise_source):
        flags = ["--pretrained_model_name_or_path", args.pretrained_model_name_or_path,
                 "--dataset_name", args.dataset_name, "--resolution", str(args.resolution),
                 "--loss_type", loss_type, "--noise_source", noise_source,
                 "--num_inversion_steps", str(args.num_inversion_steps),
                 "--inversion_schedule", args.inversion_schedule,
                 "--num_renoise_steps", str(args.num_renoise_steps), "--train_batch_size", str(args.train_batch_size)]
        switches = {"--full_finetune": args.full_finetune, "--use_8bit_adam": args.use_8bit_adam,
                    "--gradient_checkpointing": args.gradient_checkpointing}
        return flags + [flag for flag, on in switches.items() if on]

    def step(self):
        from smpo.step import training_step

        with self.autocast:
            loss, _ = training_step(self.args, self.batch, self.models, self.generator, self.objective,
                                    self.noise_source)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def measure(self, device):
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        self.calls = 0
        with PeakHeap() as heap:
            sync()
            start = time.perf_counter()
            self.step()
            sync()
            self.times.append(time.perf_counter() - start)
        self.call_counts.append(self.calls)
        used = torch.cuda.max_memory_allocated() - base if device.startswith("cuda") else heap.growth
        self.memory = max(self.memory, used)


def make_batch(args, script):
    import datasets

    from smpo.data import PairDataset, PairTransform, PreferenceCollator

    dataset = datasets.load_from_disk(args.dataset_name)
    collator = PreferenceCollator(PairTransform(args.resolution), "smpo", seed=args.seed)
    pairs = PairDataset(dataset, list(range(args.train_batch_size)))
    batch = collator([pairs[i] for i in range(len(pairs))])
    return {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def quick_assets(args):
    """--quick: build the tiny assets and score them, like the quick start."""
    work = tempfile.mkdtemp(prefix="smpo-bench-")
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], check=True, cwd=ROOT, capture_output=True)  # noqa: E731
    assets = args.assets or work
    if args.assets is None:
        run("examples/make_tiny_assets.py", work)
    if args.dataset_name is None:
        run("score_pairs.py", "--dataset_name", f"{assets}/tiny-pickapic", "--reward_model_name_or_path",
            f"{assets}/tiny-reward", "--output_dir", f"{work}/scored", "--device", "cpu")
        args.dataset_name = f"{work}/scored"
    args.pretrained_model_name_or_path = f"{assets}/tiny-{'sdxl' if args.sdxl else 'sd'}"
    args.device, args.warmup_steps = "cpu", 2
    args.steps = args.steps or 8
    args.threads = args.threads or 1


def main(args):
    if args.quick:
        quick_assets(args)
    args.steps = args.steps or 20
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pretrained_model_name_or_path is None or args.dataset_name is None:
        raise SystemExit("give --quick, or --pretrained_model_name_or_path and --dataset_name (a scored dataset)")
    if args.sdxl:
        import train_smpo_diffusion_sdxl as script
        conditioning_class = script.SDXLConditioning
    else:
        import train_smpo_diffusion as script
        conditioning_class = script.SDConditioning
    from smpo.setup import load_frozen_parts

    torch.manual_seed(args.seed)
    base_args = script.parse_args(Setup.flags(args, "smpo", "renoise"))
    conditioning, vae, schedule = load_frozen_parts(base_args, conditioning_class, args.device, Setup.weight_dtype(args))
    batch = make_batch(args, script)
    setups = [Setup(name, args, script, conditioning, vae, schedule, batch) for name in CONFIGS]

    for _ in range(args.warmup_steps):
        for s in setups:
            s.step()
    from tqdm.auto import tqdm

    for _ in tqdm(range(args.steps), desc="measuring (interleaved)"):
        for s in setups:
            s.measure(args.device)
    report(args, setups)


def report(args, setups):
    import statistics

    rows = {s.name: (statistics.median(s.times), sum(s.call_counts) / len(s.call_counts), s.memory) for s in setups}
    dpo_time, dpo_calls, dpo_mem = rows["dpo"]
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s))")
    memory_kind = "max_memory_allocated" if args.device.startswith("cuda") else "peak C-heap growth (mallinfo2)"
    print(f"\n{args.pretrained_model_name_or_path} on {device}; {'full' if args.full_finetune else 'LoRA'}, "
          f"batch {args.train_batch_size} pair(s), {args.resolution}px, {args.mixed_precision}, K={args.num_inversion_steps}, "
          f"R={args.num_renoise_steps}, schedule {args.inversion_schedule}; median of {args.steps} interleaved steps "
          f"after {args.warmup_steps} warm-up")
    print(f"{'config':<14}{'s/step':>9}{'x DPO':>8}{'img-fwd':>9}{'floor x DPO':>13}{'memory MiB':>12}{'x DPO':>8}")
    images = 2 * args.train_batch_size  # winners and losers
    for name, (seconds, calls, memory) in rows.items():
        floor = (4 + (calls - dpo_calls) / images) / 4
        print(f"{name:<14}{seconds:>9.4f}{seconds / dpo_time:>8.2f}{calls:>9.1f}{floor:>13.2f}"
              f"{memory / 2**20:>12.1f}{memory / max(dpo_mem, 1):>8.2f}")
    print(f"(memory: {memory_kind} during one step; img-fwd: UNet image-forwards per step; floor: (4 + no-grad "
          "inversion image-forwards per image) / 4 UNet units)")


if __name__ == "__main__":
    main(parse_args())
