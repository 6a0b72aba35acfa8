"""Where the time of MDRA pretraining goes: the training step, the data pipeline, the loss, and mdra.py's paths.

One run prints one table (and writes it, a JSON line per row and the full log under --out):
- step: mdra.py's training step (mdra.micro_step, then the LARS step and the EMA update, on the networks of
  mdra.networks as mdra.compiled leaves them) on synthetic device-resident images, for each architecture and
  configuration {eager, compiled (--compile=all)} x {fp32, bf16} x {nchw, cl (channels_last)}: image
  pairs/s, peak memory, model FLOPs per pair (counted with FlopCounterMode) and, on CUDA, the achieved
  fraction of a bf16 matmul peak measured in the same run;
- loss: mdra_loss forward and backward at each B x N x G of --loss-cases, eager (with its Sinkhorn part)
  against torch.compile(mdra_loss) (--compile=loss): ms, the compiled speed-up, the compile time, whether
  the compiled loss and gradients are the eager ones (their largest differences), and the share of a step;
- parts: the same eager against compiled for the rest of the step: the LARS step over the first
  architecture's networks, the EMA update, the queue write;
- data: mdra.py's loader (mdra.pretrain_loader: the real two-view augmentation and DataLoader settings)
  on an ImageFolder of JPEGs at ImageNet-like sizes that it generates (or --data), with --workers; with
  --gpu-aug also the views made on the device (an in-memory data set: --data fashion-mnist, synthetic, ...);
  against the step, to show which one is the bottleneck;
- e2e: the step of the first architecture fed by each loader, against the same step on synthetic data;
- paths (only when named): mdra.py itself, run by its own command line (a process of its own per run
  on CUDA), on each path of PATHS (each --compile choice; the views made on the device; both) against the
  reference (eager, the CPU loader): pairs/s and the share of the time waited for data, read from its
  log.jsonl over the log windows after the first, end to end on Fashion-MNIST (seconds per epoch too) and on
  synthetic images for each --path-cases; and the host operations per optimizer step (mdra.py's loop
  set up in this process, counted with the PyTorch profiler).

Timing: warm-up, then the median over --repeats of --steps steps (CUDA events on the GPU); the data
and end-to-end rates are taken in the steady state, after the workers' first round of batches (e2e:
after as many as the loader prefetches, then the median of --repeats windows of --e2e-steps steps, the
range in the vs column), and wait for the device only at both ends of the timed batches, as the
training loop does not wait for it. Compile times are with what the machine's compile caches hold from
earlier runs (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1: without them, as a first compilation).
A measurement that fails becomes a row saying why; --time-limit skips compilations that would not fit.

    python benchmarks/bench_train.py                                  # CPU, small sizes
    python benchmarks/bench_train.py --preset h100 --out runs/bench   # one H100
    python benchmarks/bench_train.py --device cuda --archs resnet50 --configs compiled-bf16-cl \\
        --batch-size 128 --sections step e2e --data /path/to/imagenet/train
    python benchmarks/bench_train.py --preset h100 --sections paths --time-limit 300   # mdra.py's paths on one GPU
    python benchmarks/bench_train.py --sections loss --loss-cases 64:65536 512:65536 256:4096 --device cpu \\
        --out runs/bench-loss                                         # the loss, eager against compiled, on the CPU
"""
import argparse
import contextlib
import datetime
import gc
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402  (the repository root is on the path only from here)
import mdra  # noqa: E402
import runtime  # noqa: E402

# The paths of mdra.py that the paths section compares, each as the mdra.py flags that select it. The
# reference comes first: the CPU loader, eager.
PATHS = {
    "reference": ["--no-gpu-aug", "--compile=none"],
    "compiled-loss": ["--no-gpu-aug", "--compile=loss"],          # torch.compile of the relation alignment
    "compiled-networks": ["--no-gpu-aug", "--compile=networks"],  # ... of the encoders
    "compiled-all": ["--no-gpu-aug", "--compile=all"],
    "device-data": ["--gpu-aug", "--compile=none"],               # the views made on the device (gpu_aug.py)
    "all": ["--gpu-aug", "--compile=all"],
}


def compile_choice(flags):
    """What a path's flags have torch.compile cover: none, loss, networks or all."""
    return next(flag.split("=", 1)[1] for flag in flags if flag.startswith("--compile="))


PRESETS = {
    "cpu": dict(device="cpu", archs=["resnet18", "resnet50"], img_size=96, batch_size=16, queue_size=4096,
                configs=["eager-fp32-nchw", "eager-bf16-nchw", "eager-fp32-cl"], warmup=1, steps=2, repeats=3,
                data_images=640, workers=os.cpu_count(), e2e_steps=8,
                paths=[name for name in PATHS if compile_choice(PATHS[name]) == "none"],  # inductor takes minutes here
                path_cases=["resnet18:16:8:1", "resnet50:32:4:1"], path_windows=1,
                fmnist_case="resnet18:16:4:1", fmnist_steps=2, host_ops_case="resnet18:16:8", host_ops_steps=1),
    "h100": dict(device="cuda", archs=["resnet50", "resnet18"], img_size=224, batch_size=64, queue_size=65536,
                 configs=["eager-fp32-nchw", "eager-fp32-cl", "eager-bf16-nchw", "eager-bf16-cl", "compiled-bf16-cl"],
                 warmup=5, steps=10, repeats=3, data_images=16384, workers=16,
                 e2e_steps=60, time_limit=420,
                 path_cases=["resnet18:28:256:40", "resnet50:32:256:20", "resnet50:96:128:10"], path_windows=3,
                 fmnist_case="resnet18:28:256:39", fmnist_steps=312, host_ops_case="resnet18:28:256", host_ops_steps=5),
}
SECTIONS = ("step", "loss", "parts", "data", "e2e", "paths")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default="cpu", help="defaults for the flags below; explicit flags win")
    a("--device", choices=["cpu", "cuda"])
    a("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS[:-1]),
      help="paths runs only when named: its runs of mdra.py take minutes on a GPU")
    a("--archs", nargs="+", help="mdra.py --arch names; the first one is the reference of the data and e2e rows "
                                 "and the network of the parts rows (the loss rows are related to each)")
    a("--img-size", type=mdra.crop_size,
      help="crop size (a small stem at <= 64 px, as in mdra.py for an ImageFolder); at least 8 px")
    a("--batch-size", type=int, help="micro-batch of one GPU (the ImageNet recipe: 512 over 8 GPUs = 64)")
    a("--accum-steps", type=int, default=1, help="micro-batches per timed optimizer step")
    a("--queue-size", type=int, help="N of the step's loss and of the parts' queue write")
    a("--groups", type=int, default=4, help="G of the step, the queue write and the loss cases that give none")
    a("--hidden-dim", type=int, default=4096, help="mdra.py --hidden-dim, of the steps and the paths' runs")
    a("--configs", nargs="+", help="MODE-DTYPE-LAYOUT with MODE eager|compiled, DTYPE fp32|bf16 and LAYOUT "
                                   "nchw|cl; the first is the baseline of the speed-up column")
    a("--compile-backend", default="inductor", help="of the compiled configurations, loss and parts rows")
    a("--warmup", type=int, help="untimed steps after the first (which compiles, and is never timed)")
    a("--steps", type=int, help="steps per timed repeat")
    a("--repeats", type=int, help="timed repeats; the median is reported")
    a("--data", help="an existing ImageFolder, or a data set name of mdra.py (e.g. fashion-mnist, with "
                     "--data-dir, or synthetic:N), to read instead of generated JPEGs")
    a("--data-dir", default="data", help="where mdra.py's named data sets are read from")
    a("--data-images", type=int, help="JPEGs to generate (enough for several rounds of all workers)")
    a("--workers", type=int)
    a("--gpu-aug", action=argparse.BooleanOptionalAction, default=False,
      help="also measure mdra.py --gpu-aug's views, made on the device (needs an in-memory --data)")
    a("--loss-cases", nargs="+", default=["64:65536", "512:65536", "256:4096"],
      help="B:N[:G] of each pair of loss rows (eager, compiled): micro-batch, queue and groups (default --groups)")
    a("--e2e-steps", type=int)
    a("--e2e-config", help="configuration of the e2e rows (default: the last of --configs)")
    a("--time-limit", type=float, default=0, help="seconds; later compilations (configurations, rows, "
                                                   "paths) are skipped when less than --compile-allowance would be "
                                                   "left (0: no limit)")
    a("--compile-allowance", type=float, default=150)
    a("--paths", nargs="+", choices=list(PATHS), default=list(PATHS),
      help="paths of the paths section (PATHS; the cpu preset leaves the compiled ones out: inductor takes "
           "minutes there); the reference is always measured, as the vs column's baseline")
    a("--path-cases", nargs="*", help="ARCH:PX:PAIRS[:STEPS], each run on synthetic images: mdra.py --arch ARCH "
                                      "--img-size PX (a small data set: the small stem, queue 4096) --batch-size "
                                      "PAIRS, logged every STEPS optimizer steps (default --path-log-every)")
    a("--path-log-every", type=int, default=20)
    a("--path-windows", type=int, help="timed log windows of each run, after its first (the start: workers, "
                                       "cuDNN's autotuning, a compilation)")
    a("--fmnist-case", help="ARCH:PX:PAIRS[:STEPS] of the Fashion-MNIST rows (mdra.py --data fashion-mnist)")
    a("--fmnist-steps", type=int, help="optimizer steps of each Fashion-MNIST run (0: no such rows); at 256 pairs "
                                       "an epoch is 234")
    a("--host-ops-case", help="ARCH:PX:PAIRS of the rows that count host operations per optimizer step")
    a("--host-ops-steps", type=int, help="optimizer steps of the counted epoch, after one as long (0: no such rows)")
    a("--isolate", action=argparse.BooleanOptionalAction, default=None,
      help="run each mdra.py of the paths section as its own process, so that compile caches, GPU memory, a crash "
           "and --time-limit stay with it; default: on for CUDA")
    a("--out", help="directory for table.md, results.jsonl and log.txt")
    return p


def parse_args(argv=None):
    parser = get_parser()
    preset = parser.parse_known_args(argv)[0].preset
    parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    args.e2e_config = args.e2e_config or args.configs[-1]
    for config in {*args.configs, args.e2e_config}:
        parse_config(config)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was given but no CUDA GPU is available")
    if args.queue_size % args.batch_size:
        parser.error(f"--queue-size {args.queue_size} is not a multiple of --batch-size {args.batch_size}")
    loaders = {"data", "e2e"} & set(args.sections)
    if loaders and args.data is None and args.data_images < 2 * args.batch_size:
        parser.error(f"--data-images {args.data_images} is fewer than two batches of {args.batch_size}")
    if loaders and args.gpu_aug and (args.data or "").partition(":")[0] not in data.SMALL_DATASETS:
        parser.error("--gpu-aug makes the views of an in-memory data set on the device: give --data one of "
                     + ", ".join(data.SMALL_DATASETS) + " (JPEGs are read by the loader)")
    args.loss_cases = [parse_loss_case(text, args.groups, parser) for text in args.loss_cases]
    args.paths = list(dict.fromkeys(["reference", *args.paths]))
    args.path_cases = [parse_case(text, args.path_log_every, parser) for text in args.path_cases]
    args.fmnist_case = parse_case(args.fmnist_case, args.path_log_every, parser)
    args.host_ops_case = parse_case(args.host_ops_case, args.path_log_every, parser)
    args.isolate = args.device == "cuda" if args.isolate is None else args.isolate
    return args


@dataclass(frozen=True)
class StepConfig:
    compiled: bool
    bf16: bool
    channels_last: bool


def parse_config(text):
    parts = text.split("-")
    choices = (("eager", "compiled"), ("fp32", "bf16"), ("nchw", "cl"))
    if len(parts) != 3 or any(part not in allowed for part, allowed in zip(parts, choices)):
        raise SystemExit(f"bench_train.py: error: configuration {text!r} is not MODE-DTYPE-LAYOUT, "
                         "e.g. eager-fp32-nchw or compiled-bf16-cl")
    mode, dtype, layout = parts
    return StepConfig(mode == "compiled", dtype == "bf16", layout == "cl")


# Synthetic images and Fashion-MNIST are small data sets to mdra.py: the small stem and this queue.
PATH_QUEUE = 4096


@dataclass(frozen=True)
class Case:
    """A run of the paths section: mdra.py --arch arch --img-size img_size --batch-size batch_size,
    logging (a timed window) every log_every optimizer steps."""
    arch: str
    img_size: int
    batch_size: int
    log_every: int

    def __str__(self):
        return f"{self.arch} {self.img_size}px b{self.batch_size}"


def parse_case(text, log_every, parser):
    parts = text.split(":")
    try:
        arch, img_size, batch_size, *rest = parts
        case = Case(arch, int(img_size), int(batch_size), int(rest[0]) if rest else log_every)
    except ValueError:
        parser.error(f"case {text!r} is not ARCH:PX:PAIRS[:STEPS], e.g. resnet18:28:256 or resnet50:96:64:30")
    if len(parts) > 4 or min(case.batch_size, case.log_every) < 1:
        parser.error(f"case {text!r} is not ARCH:PX:PAIRS[:STEPS] with PAIRS and STEPS at least 1")
    if case.img_size < mdra.min_img_size(small_stem=True):
        parser.error(f"case {text!r}: {case.img_size} px is below {mdra.min_img_size(small_stem=True)}, the smallest "
                     "crop of the small stem")
    if PATH_QUEUE % case.batch_size:
        parser.error(f"case {text!r}: its queue of {PATH_QUEUE} is not a multiple of {case.batch_size} pairs")
    return case


def parse_loss_case(text, groups, parser):
    """B:N[:G] -> (B, N, G)."""
    try:
        batch, queue_size, *rest = map(int, text.split(":"))
        case = (batch, queue_size, *(rest or [groups]))
    except ValueError:
        case = ()
    if len(case) != 3 or min(case) < 1 or mdra.EMBED_DIM % case[2]:
        parser.error(f"loss case {text!r} is not B:N[:G] with positive sizes and G dividing {mdra.EMBED_DIM}, "
                     "e.g. 512:65536 or 256:4096:8")
    return case


# ------------------------------------------------------------------------------------------------
# Timing and memory
# ------------------------------------------------------------------------------------------------

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_step_time(step, device, warmup, steps, repeats):
    """Seconds per step: warm-up, then the median over repeats of the mean of `steps` steps."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000 / steps)
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def steady_rates(run_one, count, items_each, skip, device, windows=1):
    """Items per second of `windows` consecutive windows of `count` calls of run_one in the steady state:
    the first `skip` calls (worker launch, the batches prefetched before the first was asked for) are left
    out, as a long run does not pay for them again, and the device is waited for only at both ends of
    each window, as the training loop never waits for it: host work (reading, launching the
    augmentation) overlaps the device's as it does there."""
    for _ in range(skip):
        run_one()
    rates = []
    for _ in range(windows):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(count):
            run_one()
        synchronize(device)
        rates.append(count * items_each / (time.perf_counter() - t0))
    return rates


def fed_rates(step, batches, count, items_each, skip, device, windows):
    """steady_rates of step (called with a function that gives the next micro-batch) fed from the
    iterator batches, and the share of the timed windows' time spent waiting for batches."""
    waited, steps = [0.0], [0]

    def next_views():
        t0 = time.perf_counter()
        views = next(batches)
        if steps[0] > skip:  # the skipped steps' waits are left out, as their time is
            waited[0] += time.perf_counter() - t0
        return views

    def one_step():
        steps[0] += 1
        step(next_views)

    rates = steady_rates(one_step, count, items_each, skip, device, windows)
    return rates, waited[0] / sum(count * items_each / rate for rate in rates)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        PEAK_BASE[device] = torch.cuda.memory_allocated(device)
    else:
        try:  # Linux: writing 5 resets the process's peak resident size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


PEAK_BASE = {}  # CUDA: what was allocated at the reset, e.g. the step kept for the e2e rows


def peak_memory_gb(device):
    """CUDA: the peak of tensor memory since the reset, over what was allocated then (so that a step
    kept for later rows weighs on none of the rows measured meanwhile). CPU: the peak resident size of
    the process since the reset, all of it."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - PEAK_BASE.get(device, 0)) / 2**30
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 2**20
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def free_memory(device):
    """On CUDA, before a measurement of peak memory; on the CPU the collector's pass costs more than it frees."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# The step, exactly mdra.py's
# ------------------------------------------------------------------------------------------------

def one_process(device):
    return runtime.DistEnv(rank=0, world_size=1, local_rank=0, device=device)


def step_args(arch, config, args):
    """mdra.py's arguments of a step of the step section: its defaults (the method, the optimizer) with
    this benchmark's sizes and the configuration's speed flags."""
    argv = ["--arch", arch, "--img-size", str(args.img_size), "--batch-size", str(args.batch_size),
            "--accum-steps", str(args.accum_steps), "--queue-size", str(args.queue_size), "--groups", str(args.groups),
            "--hidden-dim", str(args.hidden_dim), "--amp", "bf16" if config.bf16 else "off",
            "--channels-last" if config.channels_last else "--no-channels-last",
            "--compile=all" if config.compiled else "--compile=none", "--compile-backend", args.compile_backend]
    margs = mdra.get_parser().parse_args(argv)
    margs.small_stem = args.img_size <= 64  # as mdra.py chooses it for an ImageFolder
    return margs


class TrainStep:
    """The networks, queue, LARS optimizer and EMA of mdra.train, set up as it sets them up from margs (mdra.py's
    resolved arguments); calling it runs one optimizer step of accum_steps micro-batches (mdra.micro_step), as
    mdra.train's loop does."""

    def __init__(self, margs, env):
        self.online, self.offline, _, self.queue, self.memory_format = mdra.networks(margs, env)
        self.trained, self.loss_fn = mdra.compiled(self.online, self.offline, margs, env)
        lr = margs.lr * margs.batch_size * margs.accum_steps / 256
        self.optimizer = mdra.LARS(mdra.lars_param_groups(self.online, margs.weight_decay), lr=lr, momentum=0.9)
        self.autocast = runtime.autocast(env.device, margs.amp)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=margs.amp == "fp16")
        self.progress = runtime.Progress(env.device, 0)
        self.queue_ptr, self.args, self.device = 0, margs, env.device

    def micro_step(self, v1, v2, sync_grads=True):
        v1, v2 = (v.to(self.device, non_blocking=True, memory_format=self.memory_format) for v in (v1, v2))
        loss, _, self.queue_ptr = mdra.micro_step(self.trained, self.offline, self.queue, self.queue_ptr, v1, v2,
                                                  self.args, self.autocast, self.scaler, sync_grads, self.loss_fn)
        self.progress.add(loss / self.args.accum_steps)

    def __call__(self, batches):
        """batches: a callable giving (v1, v2) for each micro-batch."""
        for micro in range(1, self.args.accum_steps + 1):
            self.micro_step(*batches(), sync_grads=micro == self.args.accum_steps)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        mdra.ema_update(self.online, self.offline, self.args.momentum)


def synthetic_views(args, device):
    g = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch_size, 3, args.img_size, args.img_size)
    return torch.randn(shape, generator=g, device=device), torch.randn(shape, generator=g, device=device)


def flops_per_pair(arch, args, device):
    """Model FLOPs of one micro-step (forward, loss, backward), counted on the eager fp32 model, per pair."""
    step = TrainStep(step_args(arch, StepConfig(False, False, False), args), one_process(device))
    v1, v2 = synthetic_views(args, device)
    with FlopCounterMode(display=False) as counter:
        step.micro_step(v1, v2)
    return counter.get_total_flops() / args.batch_size


def bf16_matmul_tflops(device, n=8192, reps=20):
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = median_step_time(lambda: a @ b, device, warmup=3, steps=reps, repeats=3)
    return 2 * n**3 / seconds / 1e12


# ------------------------------------------------------------------------------------------------
# The data pipeline
# ------------------------------------------------------------------------------------------------

def write_jpeg(job):
    """One ImageNet-like JPEG (about 500 x 375, ~100 kB at quality 90): smooth colour regions with
    texture noise, so that it costs what a photograph costs to decode."""
    path, seed = job
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(300, 450)), int(rng.integers(400, 600))
    coarse = Image.fromarray((rng.random((h // 32 + 2, w // 32 + 2, 3)) * 255).astype(np.uint8))
    pixels = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.float32) + rng.normal(0, 18, (h, w, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)


def make_image_folder(root, n, processes):
    classes = min(10, n)  # every class folder holds an image, or ImageFolder refuses the root
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    jobs = [(root / f"class{i % classes}" / f"{i:06d}.jpg", i) for i in range(n)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(write_jpeg, jobs, chunksize=16)
    return sum(path.stat().st_size for path, _ in jobs) / n


class Loader:
    """mdra.py's pretraining loader for one process: the CPU loader, or with gpu_aug the views made on the
    device (gpu_aug.DeviceViews); yields views on the device."""

    def __init__(self, root, args, device, gpu_aug):
        self.images, info = data.build_dataset(str(root), args.data_dir, "pretrain", args.img_size)
        loader_args = SimpleNamespace(img_size=args.img_size, solarize=0.0, batch_size=args.batch_size, seed=0,
                                      workers=args.workers, gpu_aug=gpu_aug)
        self.num_batches = len(self.images) // args.batch_size
        if self.num_batches < 2:
            raise SystemExit(f"bench_train.py: error: {root} has fewer than two batches of {args.batch_size} images")
        self.loader, self.sampler = mdra.pretrain_loader(self.images, info, loader_args, one_process(device),
                                                         self.num_batches)
        self.device, self.epoch = device, 0

    def batches(self):
        """(v1, v2) on the device, epoch after epoch, as mdra.train makes them."""
        while True:
            self.sampler.set_epoch(self.epoch)
            for v1, v2, _, _ in self.loader:  # the views, then the skipped counts and files
                yield v1.to(self.device, non_blocking=True), v2.to(self.device, non_blocking=True)
            self.epoch += 1

    @contextlib.contextmanager
    def running(self):
        """batches() for one measurement, then the workers stopped: mdra.py keeps them between epochs
        (persistent), and they would otherwise go on filling their prefetch queues behind the rows
        measured next; batches() starts new ones."""
        batches = self.batches()
        try:
            yield batches
        finally:
            batches.close()
            stop_workers(self.loader)


def stop_workers(loader):
    """Stop a DataLoader's persistent workers now; its next epoch starts new ones."""
    iterator, loader._iterator = getattr(loader, "_iterator", None), None
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def loader_rate(loader, batch_size, workers, device, max_batches=100):
    """Pairs/s of the loader alone (views made and on the device) over one epoch or max_batches (a
    real data set's epoch is far longer than needed), in the steady state."""
    skip = min(max(workers, 1), loader.num_batches - 1)
    with loader.running() as batches:
        return steady_rates(lambda: next(batches), min(loader.num_batches, max_batches) - skip, batch_size, skip,
                            device)[0]


def host_ops(fn):
    """How many aten operations one call of fn dispatches (views and launches alike) on this thread: the
    host work that a GPU waits behind when each is a small kernel. The same count on any device."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        fn()
    return sum(event.count for event in profiler.key_averages() if event.key.startswith("aten::"))


# ------------------------------------------------------------------------------------------------
# The measurements; each adds rows of raw numbers, compare() relates them at the end
# ------------------------------------------------------------------------------------------------

def measure_steps(report, args, device, started):
    """Every architecture and configuration: eager ones first, so that a time limit only ever cuts
    compilations. Returns the step kept for the e2e rows (or None)."""
    e2e = [args.e2e_config] if "e2e" in args.sections else []  # measured, as the e2e rows' reference
    configs = sorted(dict.fromkeys(args.configs + e2e), key=lambda c: parse_config(c).compiled)
    flops = {}
    for arch in args.archs:
        with failure_reported(report, "step", f"{arch} FLOP count"):
            flops[arch] = flops_per_pair(arch, args, device)
        free_memory(device)
    kept = None
    for compiled in (False, True):
        for arch in args.archs:
            for name in configs:
                keep = arch == args.archs[0] and name == args.e2e_config and "e2e" in args.sections
                asked = "step" in args.sections and name in args.configs
                if parse_config(name).compiled != compiled or not (asked or keep):
                    continue
                left = args.time_limit - (time.perf_counter() - started)
                if compiled and args.time_limit and left < args.compile_allowance:
                    report.add("step", f"{arch} {args.size} {name}", note=f"skipped: {left:.0f} s of --time-limit left")
                    continue
                with failure_reported(report, "step", f"{arch} {args.size} {name}"):
                    kept = measure_step(report, arch, name, flops.get(arch), args, device, keep) or kept
                free_memory(device)  # before the next configuration, whose peak memory is measured
    return kept


def measure_step(report, arch, name, flops, args, device, keep):
    """One configuration on synthetic data; returns its TrainStep if keep, else None."""
    reset_peak_memory(device)
    t0 = time.perf_counter()
    step = TrainStep(step_args(arch, parse_config(name), args), one_process(device))
    views = synthetic_views(args, device)
    step(lambda: views)  # the first step compiles and autotunes
    synchronize(device)
    first_step_s = time.perf_counter() - t0
    seconds = median_step_time(lambda: step(lambda: views), device, args.warmup, args.steps, args.repeats)
    pairs = args.batch_size * args.accum_steps
    report.add("step", f"{arch} {args.size} {name}", arch=arch, config=name, pairs_per_s=pairs / seconds,
               ms=seconds * 1e3, peak_gb=peak_memory_gb(device), gflop_per_pair=flops and flops / 1e9,
               tflops=flops and flops * pairs / seconds / 1e12, note=f"first step {first_step_s:.1f} s")
    return step if keep else None


def differences(got, expected, tolerance=1e-4):
    """The largest absolute difference of each named list of tensors from the expected one, and whether each
    is within tolerance of the largest expected magnitude (float rounding, not a different result)."""
    diffs = {name: max((a - b).abs().max().item() for a, b in zip(got[name], tensors))
             for name, tensors in expected.items()}
    return diffs, all(diff <= tolerance * max(t.abs().max().item() for t in expected[name])
                      for name, diff in diffs.items())


def measure_eager_and_compiled(report, section, case, setup, args, device, started, eager_note=None, **values):
    """Rows `case eager` and `case compiled`, each on a fresh setup(compile) -> (call, results): call runs
    what is measured once, through compile (the identity, or torch.compile with --compile-backend) of
    the function compiled; results() names the tensors it has computed, which after the first two calls
    must be the eager ones to float tolerance. compile_s: the time the first two calls took beyond two
    timed ones, the compilation and the recompilation that a changed input brings (LARS's new momentum
    buffers, the queue's pointer)."""
    expected = None
    for mode in ("eager", "compiled"):
        what, ids = f"{case} {mode}", dict(case=case, mode=mode, **values)
        left = args.time_limit - (time.perf_counter() - started)
        if mode == "compiled" and args.time_limit and left < args.compile_allowance:
            report.add(section, what, **ids, note=f"skipped: {left:.0f} s of --time-limit left")
            continue
        with failure_reported(report, section, what, **ids):
            torch._dynamo.reset()  # each compilation timed from the start
            compiled = mode == "compiled"
            call, results = setup(lambda fn: torch.compile(fn, backend=args.compile_backend) if compiled else fn)
            reset_peak_memory(device)
            t0 = time.perf_counter()
            call()
            call()
            synchronize(device)
            first_s = time.perf_counter() - t0
            got = {name: [t.detach().clone() for t in tensors] for name, tensors in results().items()}
            seconds = median_step_time(call, device, warmup=1, steps=max(2, args.steps), repeats=args.repeats)
            row = dict(ms=seconds * 1e3, peak_gb=peak_memory_gb(device), note=eager_note)
            if not compiled:
                expected = got
            else:
                row["compile_s"] = max(first_s - 2 * seconds, 0.0)
                row["note"] = f"compile {row['compile_s']:.1f} s"
                if expected:
                    row["max_abs_diff"], row["matches_eager"] = differences(got, expected)
                    row["note"] += (f"; {'matches' if row['matches_eager'] else 'DIFFERS from'} eager, max abs diff "
                                    + ", ".join(f"{name} {diff:.1g}" for name, diff in row["max_abs_diff"].items()))
            report.add(section, what, **ids, **row)
        free_memory(device)


def sinkhorn_ms(batch, queue_size, groups, args, device):
    """Milliseconds of mdra_loss's two Sinkhorn calls (R_1 and R_2) at batch x queue_size x groups."""
    g = torch.Generator(device=device).manual_seed(0)
    keys = mdra.normalize_subspaces(torch.randn(batch, mdra.EMBED_DIM, device=device, generator=g), groups)
    scores = torch.einsum("bgd,ngd->gbn", keys,
                          mdra.normalize_subspaces(mdra.init_queue(queue_size, groups, 0).to(device), groups))

    def sinkhorn_step():
        mdra.sinkhorn(scores)
        mdra.sinkhorn(scores)

    return median_step_time(sinkhorn_step, device, 1, max(2, args.steps), args.repeats) * 1e3


def measure_loss(report, batch, queue_size, groups, args, device, started):
    """mdra_loss forward + backward at batch x queue_size x groups, eager (with its Sinkhorn calls' share)
    and compiled."""
    def setup(compile):
        g = torch.Generator(device=device).manual_seed(0)
        q1, q2 = (torch.randn(batch, mdra.EMBED_DIM, device=device, generator=g, requires_grad=True) for _ in range(2))
        k1, k2 = (torch.randn(batch, mdra.EMBED_DIM, device=device, generator=g) for _ in range(2))
        queue, loss_fn, out = mdra.init_queue(queue_size, groups, 0).to(device), compile(mdra.mdra_loss), {}

        def call():
            out["loss"] = loss_fn(q1, q2, k1, k2, queue, groups)
            out["loss"].backward()
        return call, lambda: dict(loss=[out["loss"]], grads=[q1.grad, q2.grad])

    note = f"of which Sinkhorn {sinkhorn_ms(batch, queue_size, groups, args, device):.3g} ms"
    measure_eager_and_compiled(report, "loss", f"mdra_loss fwd+bwd B{batch} N{queue_size} G{groups}", setup, args,
                               device, started, eager_note=note, batch=batch)


def queue_write(queue, ptr, k1, groups):
    """mdra.micro_step's queue update (on one process)."""
    return mdra.enqueue(queue, ptr, mdra.normalize_subspaces(k1.to(queue.dtype), groups).flatten(1))


def measure_parts(report, args, device, started):
    """The rest of a step that could be compiled, eager and compiled: the LARS step (gradients of the first
    architecture's online network set), the EMA update of its offline one, and the queue update at the
    step's size."""
    arch, cuda = args.archs[0], device.type == "cuda"
    margs = step_args(arch, StepConfig(False, cuda, cuda), args)  # mdra.py's defaults on the device

    def noise(shapes):  # the same in each setup
        g = torch.Generator(device=device).manual_seed(0)
        return [torch.randn(shape, device=device, generator=g) for shape in shapes]

    def lars(compile):
        online, _, _, _, _ = mdra.networks(margs, one_process(device))
        for p, grad in zip(online.parameters(), noise([p.shape for p in online.parameters()])):
            p.grad = grad
        optimizer = mdra.LARS(mdra.lars_param_groups(online, margs.weight_decay), lr=margs.lr, momentum=0.9)
        return compile(optimizer.step), lambda: dict(parameters=list(online.parameters()))

    def ema(compile):
        online, offline, _, _, _ = mdra.networks(margs, one_process(device))
        with torch.no_grad():  # the online network a step away from the offline one
            torch._foreach_add_(list(online.parameters()), noise([p.shape for p in online.parameters()]), alpha=1e-2)
        update = compile(mdra.ema_update)
        return lambda: update(online, offline, margs.momentum), lambda: dict(offline=list(offline.parameters()))

    def write(compile):
        queue = mdra.init_queue(args.queue_size, args.groups, 0).to(device)
        keys = noise([(args.batch_size, mdra.EMBED_DIM)])[0].to(torch.bfloat16 if cuda else queue.dtype)
        update, ptr = compile(queue_write), [0]

        def call():
            ptr[0] = update(queue, ptr[0], keys, args.groups)
        return call, lambda: dict(queue=[queue])

    for case, setup in ((f"LARS step {arch}", lars), (f"EMA update {arch}", ema),
                        (f"queue write B{args.batch_size} N{args.queue_size} G{args.groups}", write)):
        measure_eager_and_compiled(report, "parts", case, setup, args, device, started)


def measure_data(report, loaders, args, device):
    for name, loader in loaders.items():
        held = not isinstance(loader.loader, DataLoader)  # gpu_aug.DeviceViews: no workers
        what = f"loader {name}, {'held on the device' if held else f'{args.workers} workers'}, {args.size}"
        with failure_reported(report, "data", what):
            rate = loader_rate(loader, args.batch_size, args.workers, device)
            report.add("data", what, loader=name, pairs_per_s=rate, ms=args.batch_size / rate * 1e3)


def measure_e2e(report, step, loaders, args, device):
    """The kept step fed by each loader: the median of --repeats windows of --e2e-steps steps, after
    as many micro-batches as the loader prefetches (a full buffer would otherwise hide a slow loader).
    The share of the windows' time the loop waited for the next views tells a loader that cannot keep
    up from a step slowed by sharing the device."""
    for name, loader in loaders.items():
        what = f"{args.archs[0]} {args.size} {args.e2e_config} fed by loader {name}"
        with failure_reported(report, "e2e", what):
            pairs = args.batch_size * args.accum_steps
            # what the loader makes ahead: its workers' prefetch (the device views are made when asked for)
            prefetched = args.workers * (loader.loader.prefetch_factor or 1) if isinstance(loader.loader, DataLoader) else 0
            skip = max(1, math.ceil(prefetched / args.accum_steps))
            with loader.running() as batches:
                rates, data_wait = fed_rates(step, batches, args.e2e_steps, pairs, skip, device, args.repeats)
            rate = statistics.median(rates)
            used = (skip + args.repeats * args.e2e_steps) * args.accum_steps
            note = (f"median of {args.repeats} x {args.e2e_steps} steps after {skip}; "
                    f"waited for views {100 * data_wait:.0f}%")
            if used > loader.num_batches:
                note += (f"; crosses an epoch boundary ({loader.num_batches} micro-batches per epoch), whose "
                         f"restart a long epoch would pay far less often: give more --data-images")
            report.add("e2e", what, loader=name, pairs_per_s=rate, ms=pairs / rate * 1e3, window_rates=rates,
                       data_wait=data_wait, note=note)


# ------------------------------------------------------------------------------------------------
# The paths section: mdra.py itself, path against path
# ------------------------------------------------------------------------------------------------

def measure_paths(report, args, device, started):
    """Each path of --paths against the reference, as mdra.py runs: end to end on Fashion-MNIST, on
    synthetic images for each case, and the host operations per optimizer step. Eager paths first, so
    that a time limit only ever cuts compilations, and of those the quick host-op counts before the
    long runs."""
    table = []  # (group, kind, case, path) in the order of the table
    if args.fmnist_steps:
        table += [(f"fashion-mnist {args.fmnist_case}", "fashion-mnist", args.fmnist_case, name) for name in args.paths]
    table += [(f"synthetic {case}", "synthetic", case, name) for case in args.path_cases for name in args.paths]
    if args.host_ops_steps:
        table += [(f"host ops {args.host_ops_case}", "host ops", args.host_ops_case, name) for name in args.paths]
    fmnist_images = None

    def run_order(entry):  # eager first, and the quick ones first
        _, (_, kind, _, name) = entry
        return compile_choice(PATHS[name]) != "none", kind != "host ops"

    with tempfile.TemporaryDirectory(prefix="mdra_bench_paths_") as tmp:
        for index, (group, kind, case, name) in sorted(enumerate(table), key=run_order):
            flags = PATHS[name]
            what, ids = f"{group} {name}", dict(group=group, path=name, compile=compile_choice(flags),
                                                gpu_aug="--gpu-aug" in flags)
            left = args.time_limit - (time.perf_counter() - started)
            if args.time_limit and left < (args.compile_allowance if ids["compile"] != "none" else 0):
                report.add("paths", what, **ids, note=f"skipped: {max(left, 0):.0f} s of --time-limit left")
                continue
            out_dir = Path(tmp) / f"run{index}"
            with failure_reported(report, "paths", what, **ids):
                if kind == "fashion-mnist" and fmnist_images is None:
                    fmnist_images = len(data.build_dataset("fashion-mnist", args.data_dir, "pretrain")[0])
                if kind == "host ops":
                    measure_host_ops(report, what, ids, case, flags, args, device, out_dir)
                else:
                    images = fmnist_images if kind == "fashion-mnist" else None
                    measure_path_run(report, what, ids, case, kind, flags, args, out_dir,
                                     left if args.time_limit else None, images)
            shutil.rmtree(out_dir, ignore_errors=True)  # its checkpoint: hundreds of MB
            free_memory(device)
    order = [(group, name) for group, _, _, name in table]
    rows = sorted((row for row in report.rows if row["section"] == "paths"),
                  key=lambda row: order.index((row["group"], row["path"])))
    report.rows = [row for row in report.rows if row["section"] != "paths"] + rows


def measure_path_run(report, what, ids, case, data_name, flags, args, out_dir, timeout, images):
    """One mdra.py run on data_name (fashion-mnist or synthetic): its steady pairs/s and wait for data,
    and with the data set's number of images, its seconds per epoch at that rate (and as measured for
    each whole epoch after the first)."""
    steps = args.fmnist_steps if data_name == "fashion-mnist" else case.log_every * (1 + args.path_windows)
    records = run_script(mdra, mdra_argv(case, data_name, steps, flags, args, out_dir), out_dir, args.isolate, timeout)
    if report.out:  # the run's own record
        kept = report.out / "paths" / what.replace(" ", "_")
        kept.mkdir(parents=True, exist_ok=True)
        for name in ("log.jsonl", "console.txt"):
            shutil.copy(out_dir / name, kept / name)
    rate, data_wait, timed = steady_state(records, case.batch_size)
    note = f"{timed} of {steps} steps timed, after the first window; waited for data {100 * data_wait:.0f}%"
    values = dict(pairs_per_s=rate, ms=case.batch_size / rate * 1e3, data_wait=data_wait, steps=steps)
    if images:
        images_per_epoch = images // case.batch_size * case.batch_size
        epochs = [record["time_s"] for record in records if record.get("event") == "epoch"][1:]
        values["s_per_epoch"] = images_per_epoch / rate
        note += f"; {values['s_per_epoch']:.3g} s per epoch of {images_per_epoch} images at that rate"
        if epochs:
            note += ", measured " + " / ".join(f"{seconds:.3g}" for seconds in epochs) + " s (epochs after the first)"
    report.add("paths", what, **ids, **values, note=note)


def measure_host_ops(report, what, ids, case, flags, args, device, out_dir):
    ops = count_host_ops(case, flags, args, device, out_dir)
    report.add("paths", what, **ids, host_ops=ops,
               note=f"per optimizer step: aten operations of the loop's thread, over an epoch of "
                    f"{args.host_ops_steps} steps after one as long")


def mdra_argv(case, data_name, steps, flags, args, out_dir):
    """mdra.py's command line for steps optimizer steps of case on data_name with a path's flags; everything
    else is mdra.py's default (bf16 autocast and channels_last on CUDA, the learning-rate schedule). The
    synthetic images are one epoch, so that no epoch boundary falls inside the timed windows."""
    if data_name == "synthetic":
        data_name = f"synthetic:{case.batch_size * steps}"
    return ["--data", data_name, "--arch", case.arch, "--hidden-dim", str(args.hidden_dim), "--img-size",
            str(case.img_size), "--batch-size", str(case.batch_size), "--accum-steps", "1", "--queue-size",
            str(PATH_QUEUE), "--device", args.device, "--workers", str(args.workers), "--max-steps", str(steps),
            "--log-every", str(case.log_every), "--save-every", str(steps), "--keep-every", "0",
            "--compile-backend", args.compile_backend, "--data-dir", args.data_dir, "--out-dir", str(out_dir), *flags]


def run_script(script, argv, out_dir, isolate, timeout):
    """script (a module such as mdra) with argv, as its own process (isolate: stopped after timeout seconds,
    None: never) or in this one, its console in out_dir/console.txt; returns the records of its log.jsonl."""
    out_dir.mkdir(parents=True)
    console, name = out_dir / "console.txt", Path(script.__file__).name
    with open(console, "w") as output:
        if isolate:
            status = run_process([sys.executable, script.__file__, *argv], output, timeout)
        else:
            torch._dynamo.reset()  # nothing compiled by an earlier run is reused
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                try:
                    script.main(argv)
                    status = 0
                except SystemExit as e:  # a usage error, or a stop signal, which stops this benchmark too
                    if e.code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
                        raise
                    status = e.code
    if status:
        last = (console.read_text().strip().splitlines() or [""])[-1]
        raise RuntimeError(f"{name} exited with status {status}: {last}")
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def run_process(command, output, timeout):
    """The exit status of command; after timeout seconds it is killed, with the processes it started."""
    with subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True) as process:
        try:
            return process.wait(timeout=timeout)
        except BaseException as e:  # the time is up, or this benchmark is stopping: so does the run
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if isinstance(e, subprocess.TimeoutExpired):
                raise RuntimeError(f"stopped after {timeout:.0f} s, the time left of --time-limit") from None
            raise


def steady_state(records, batch_size, rate="pairs_per_s", prog="mdra.py"):
    """Pairs/s (or the rate named), the share of the time waited for data and the steps timed, over the
    log windows after the first (which holds the start: the workers, cuDNN's autotuning, a compilation)."""
    logged = [record for record in records if rate in record]
    windows = [(record["step"] - before["step"], record) for before, record in zip(logged, logged[1:])]
    if not windows:
        raise RuntimeError(f"{prog} logged {len(logged)} window, too few to leave the first out")
    seconds = [steps * batch_size / record[rate] for steps, record in windows]
    steps = sum(steps for steps, _ in windows)
    waited = sum(record["data_wait"] * t for (_, record), t in zip(windows, seconds))
    return steps * batch_size / sum(seconds), waited / sum(seconds), steps


def count_host_ops(case, flags, args, device, out_dir):
    """Aten operations per optimizer step of mdra.py's loop with a path's flags, set up in this process as
    mdra.train sets it up: over a whole epoch of --host-ops-steps steps, after an epoch as long that warms
    up (the workers, LARS's momentum, a compilation). Loader workers are processes of their own and are
    not counted; with --workers 0 the CPU loader's operations are."""
    margs = mdra.get_parser().parse_args(mdra_argv(case, "synthetic", args.host_ops_steps, flags, args, out_dir))
    env = one_process(device)
    images, info = data.build_dataset(margs.data, margs.data_dir, "pretrain", margs.img_size)
    margs = mdra.resolve_args(margs, info, env)
    torch._dynamo.reset()
    step = TrainStep(margs, env)
    loader, sampler = mdra.pretrain_loader(images, info, margs, env, args.host_ops_steps)

    def epoch(index):
        sampler.set_epoch(index)
        batches = iter(loader)
        for _ in range(args.host_ops_steps):
            step(lambda: next(batches)[:2])
        synchronize(device)

    try:
        epoch(0)
        return host_ops(lambda: epoch(1)) / args.host_ops_steps
    finally:
        stop_workers(loader)


@contextlib.contextmanager
def failure_reported(report, section, what, **values):
    """A measurement that fails (out of memory, a compiler error) becomes a row saying why, with the
    traceback in the log, and the run goes on with the other measurements."""
    try:
        yield
    except Exception as e:
        report.log(traceback.format_exc())
        report.add(section, what, **values, note=f"failed: {type(e).__name__}: {str(e)[:200]}")


def compare(rows, args):
    """The vs column: each row against its baseline in this run."""
    paths = [row for row in rows if row["section"] == "paths"]
    for row in paths:  # against the reference path of its group
        for key in ("pairs_per_s", "host_ops"):
            reference = next((r for r in paths if (r["group"], r["path"]) == (row["group"], "reference") and key in r),
                             None)
            if key in row and reference:
                row["vs"] = f"{row[key] / reference[key]:.2f}x reference"
    steps = [row for row in rows if row["section"] == "step" and "pairs_per_s" in row]
    peak = next((row["tflops"] for row in rows if row["section"] == "peak" and "tflops" in row), None)

    def fastest(arch):
        return max((row for row in steps if row["arch"] == arch), key=lambda row: row["pairs_per_s"], default=None)

    reference = next((row for row in steps if (row["arch"], row["config"]) == (args.archs[0], args.e2e_config)),
                     fastest(args.archs[0]))
    for row in steps:
        baseline = next((b for b in steps if (b["arch"], b["config"]) == (row["arch"], args.configs[0])), None)
        if baseline:
            row["vs"] = f"{row['pairs_per_s'] / baseline['pairs_per_s']:.2f}x {args.configs[0]}"
        if peak and row["tflops"]:
            row["pct_peak"] = 100 * row["tflops"] / peak
    for row in rows:
        if "ms" not in row:  # failed or skipped
            continue
        if row["section"] in ("loss", "parts"):
            eager = next((r for r in rows if (r["section"], r.get("case"), r.get("mode")) ==
                          (row["section"], row["case"], "eager") and "ms" in r), None)
            relations = []
            if eager:  # the compiled speed-up
                speedup = eager["ms"] / row["ms"]
                relations.append(f"{speedup:.2f}x eager")
                if row["mode"] == "compiled":
                    row["speedup"] = speedup
            for arch in args.archs if row["section"] == "loss" else ():
                step = fastest(arch)
                if step:  # a step at the loss's batch, at the fastest measured rate
                    relations.append(f"{100 * row['ms'] / 1e3 * step['pairs_per_s'] / row['batch']:.1f}% of a "
                                     f"{arch} {step['config']} step at B{row['batch']}")
            row["vs"] = "; ".join(relations) or None
        elif row["section"] == "data" and reference:
            ratio = reference["pairs_per_s"] / row["pairs_per_s"]
            bound = "the loader is the bottleneck" if ratio > 1 else "the step is the bottleneck"
            row["vs"] = f"{1 / ratio:.2f}x the {reference['what']} step: {bound}"
        elif row["section"] == "e2e" and reference:
            low, high = (min(row["window_rates"]) / reference["pairs_per_s"],
                         max(row["window_rates"]) / reference["pairs_per_s"])
            row["vs"] = f"{row['pairs_per_s'] / reference['pairs_per_s']:.2f}x (windows {low:.2f}–{high:.2f}x) the same step on synthetic data"


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------

class Report:
    """Rows logged as they are measured, then one table; the log, the rows (JSON lines) and the
    table also go under --out."""

    COLUMNS = {"section": "section", "what": "what", "pairs/s": "pairs_per_s", "ms": "ms", "compile s": "compile_s",
               "peak GB": "peak_gb",
               "GFLOP/pair": "gflop_per_pair", "TFLOPS": "tflops", "% bf16 peak": "pct_peak", "host ops": "host_ops", "vs": "vs",
               "note": "note"}

    def __init__(self, out):
        self.rows, self.out = [], Path(out) if out else None
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            self.log_file = open(self.out / "log.txt", "w")

    def log(self, text):
        print(text, flush=True)
        if self.out:
            self.log_file.write(text + "\n")
            self.log_file.flush()

    def add(self, section, what, **values):
        self.rows.append({"section": section, "what": what, **values})
        self.log("  " + json.dumps(self.rows[-1]))

    def table(self):
        def cell(value):
            if value is None:
                return ""
            if isinstance(value, float):
                return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
            return str(value)

        lines = ["| " + " | ".join(self.COLUMNS) + " |", "|" + "---|" * len(self.COLUMNS)]
        lines += ["| " + " | ".join(cell(row.get(key)) for key in self.COLUMNS.values()) + " |" for row in self.rows]
        return "\n".join(lines)

    def finish(self, header):
        order = ("peak", "step", "loss", "parts", "data", "e2e", "paths")
        self.rows.sort(key=lambda row: order.index(row["section"]))  # stable: measuring order within a section
        table = f"{header}\n\n{self.table()}\n"
        self.log("\n" + table)
        if self.out:
            (self.out / "table.md").write_text(table)
            (self.out / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in self.rows))


def environment(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return (f"{datetime.datetime.now().isoformat(timespec='seconds')} | git {runtime.git_sha()} | {device} ({name}) | "
            f"{os.cpu_count()} CPUs | torch {torch.__version__} | torchvision {torchvision.__version__} | "
            f"python {platform.python_version()}")


def main(argv=None):
    args = parse_args(argv)
    args.size = f"{args.img_size}px b{args.batch_size}" + (f"x{args.accum_steps}" if args.accum_steps > 1 else "")
    device = torch.device(args.device)
    if device.type == "cuda":  # as mdra.train sets them
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    report = Report(args.out)
    report.log("bench_train.py " + " ".join(sys.argv[1:] if argv is None else argv))
    report.log(environment(device))
    report.log("args " + json.dumps(vars(args), default=repr))  # a Case as Case(...)

    if device.type == "cuda":
        with failure_reported(report, "peak", "bf16 matmul 8192^3"):
            report.add("peak", "bf16 matmul 8192^3", tflops=bf16_matmul_tflops(device))

    generated, loaders = None, {}
    try:
        if {"data", "e2e"} & set(args.sections):
            root = args.data
            if root is None:
                root = generated = Path(tempfile.mkdtemp(prefix="mdra_bench_jpegs_"))
                t0 = time.perf_counter()
                kb = make_image_folder(generated, args.data_images, max(1, args.workers)) / 1e3
                report.log(f"generated {args.data_images} JPEGs of {kb:.0f} kB on average in {time.perf_counter() - t0:.0f} s")
            for gpu_aug in (False, True) if args.gpu_aug else (False,):
                name = "gpu-aug" if gpu_aug else "cpu-aug"
                with failure_reported(report, "data", f"loader {name}"):
                    loaders[name] = Loader(root, args, device, gpu_aug)
        if "data" in args.sections:
            measure_data(report, loaders, args, device)
        for batch, queue, groups in args.loss_cases if "loss" in args.sections else ():
            with failure_reported(report, "loss", f"mdra_loss B{batch} N{queue} G{groups}"):
                measure_loss(report, batch, queue, groups, args, device, started)
            free_memory(device)
        if "parts" in args.sections:
            measure_parts(report, args, device, started)
        kept = None
        if {"step", "e2e"} & set(args.sections):
            kept = measure_steps(report, args, device, started)
        if "e2e" in args.sections and kept is not None:
            measure_e2e(report, kept, loaders, args, device)
        elif "e2e" in args.sections:
            report.add("e2e", f"{args.archs[0]} {args.size} {args.e2e_config}", note="skipped with its step")
        if "paths" in args.sections:
            kept = None  # its memory is not the paths' to share
            free_memory(device)
            measure_paths(report, args, device, started)
    finally:
        if generated:
            shutil.rmtree(generated, ignore_errors=True)
    compare(report.rows, args)
    report.finish(f"{environment(device)} | total {time.perf_counter() - started:.0f} s\n"
                  f"command: python benchmarks/bench_train.py {' '.join(sys.argv[1:] if argv is None else argv)}")


if __name__ == "__main__":
    main()
