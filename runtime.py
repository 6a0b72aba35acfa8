"""The machinery that mdra.py, eval_knn.py and finetune.py share, so that each is written once:
processes and devices (torchrun, NCCL / gloo), run_main and UsageError, stop signals, logging and the
git SHA, checkpoint and file writing with the resume guard and the out-dir lock, a training loop's
running figures, and the command-line flags and checks every script takes.

Nothing here is the method, and nothing here imports the project's other modules: imports point one way,
finetune.py / eval_knn.py -> mdra.py (the method) -> knn.py, gpu_aug.py -> data.py -> runtime.py.
"""
import argparse
import contextlib
import datetime
import errno
import fcntl
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader


# ------------------------------------------------------------------------------------------------
# Errors and the main function
# ------------------------------------------------------------------------------------------------

class UsageError(Exception):
    """A mistake the user can fix; reported as one sentence, without a traceback."""


class WrongFormat(UsageError):
    """A readable checkpoint of another format than the one asked for (found: its format)."""

    def __init__(self, message, found):
        super().__init__(message)
        self.found = found


def out_of_memory(error):
    """How a failed allocation reads in a sentence ("out of memory (2 GiB more)"), or None if error is not
    one: torch's on a GPU (OutOfMemoryError) and on the CPU (its allocator's RuntimeError), numpy's."""
    if not (isinstance(error, (MemoryError, torch.OutOfMemoryError))
            or isinstance(error, RuntimeError) and "can't allocate memory" in str(error)):
        return None
    size = re.search(r"allocate ([\d.]+) ?(bytes|[KMGTPE]iB)", str(error))
    if size is None:
        return "out of memory"
    units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    number, unit = float(size[1]), units.index(size[2])
    while number >= 1024 and unit < len(units) - 1:
        number, unit = number / 1024, unit + 1
    return f"out of memory ({number:.3g} {units[unit]} more)"


def run_main(train_fn, argv, parser, memory_flags="--batch-size"):
    """Parse arguments and run; a UsageError becomes one sentence on stderr and exit status 2, running
    out of memory one sentence that names memory_flags (the flags that size it) and exit status 1, and a
    stop signal that a training loop deferred (defer_stop_signals) exit status 128 + the signal."""
    args = parser.parse_args(argv)
    STOP_SIGNALS.clear()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    # Only the message is kept: the traceback would keep the loaders, and their workers, alive.
    message, status = None, 0
    try:
        result = train_fn(args)
    except UsageError as e:
        message, status = f"error: {e}", 2
    except KeyboardInterrupt:
        message, status = "interrupted", 128 + signal.SIGINT
    except Exception as e:  # a crash ends with its traceback and status 1, after the teardown below
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if (memory := out_of_memory(e)) is not None:  # its traceback would say nothing more to act on
            where = f"rank {dist.get_rank()} ran " if distributed else ""
            message, status = f"error: {where}{memory}; lower {memory_flags}.", 1
        elif distributed:
            message = f"rank {dist.get_rank()} stopped by {type(e).__name__}: {e} (its traceback follows)"
        if not status:
            raise
    finally:  # the workers a crash left would hang the exit
        if message:  # first: under NCCL the teardown may wait for ranks still inside a collective
            print(f"{parser.prog}: {message}", file=sys.stderr, flush=True)
        kill_loader_workers()
        _close_held_locks()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # the control group with it
        global _CONTROL
        _CONTROL = None
    if status:
        sys.exit(status)
    if STOP_SIGNALS:  # received after the loop's last look, e.g. while finetune.py exported
        sys.exit(128 + STOP_SIGNALS[0])
    return result


def kill_loader_workers():
    """Kill the data-loading workers an error left running (a finished loader has stopped its own).
    They ignore SIGTERM, which is all that multiprocessing sends them at exit before waiting for them,
    forever, while the error's traceback still holds their loader."""
    workers = multiprocessing.active_children()
    if workers:  # their DataLoader's SIGCHLD handler would report each death as one more error
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()
        worker.join()


def ignore_stop_signals(worker_id=None):
    """Data-loading workers ignore SIGTERM / SIGINT: schedulers signal the whole process group, and
    the training loop must outlive its workers long enough to save a checkpoint."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ------------------------------------------------------------------------------------------------
# Processes and devices
# ------------------------------------------------------------------------------------------------

@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control: object = None  # with several ranks, a gloo group of all: the CPU channel for stop flags and waits

    @property
    def is_main(self):
        return self.rank == 0


def resolve_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was given but no CUDA GPU is available.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return name


def setup_distributed(device_name):
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is one plain process."""
    device_name = resolve_device(device_name)
    if "RANK" not in os.environ:
        return DistEnv(0, 1, 0, torch.device(device_name))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device_name == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    global _CONTROL
    # Its own timeout: runtime.in_turns waits in it while one rank downloads a data set (STL-10: 2.6 GB),
    # which NCCL's watchdog would end after 10 minutes.
    _CONTROL = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if world > 1 else None
    return DistEnv(rank, world, local, device, _CONTROL)


CONTROL_TIMEOUT = datetime.timedelta(hours=2)
_CONTROL = None  # setup_distributed's DistEnv.control, for in_turns, which its callers do not hand the DistEnv


def all_reduce(tensor, op=dist.ReduceOp.SUM):
    """tensor reduced over all ranks, in place; nothing to do for one (torchrun's single rank included)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


# DDP that does not broadcast the BatchNorm buffers in forward: each rank keeps its own statistics. torch 2.14
# renamed the switch, and warns at the old name; the new one also broadcasts them once, when DDP wraps the
# network, where every rank's are equal (the same initialisation or checkpoint): that changes nothing.
NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                          else {"broadcast_buffers": False})


def ddp(module, env, buffers=True):
    """module wrapped in DDP on env's device (gradients all-reduced into their buckets); without buffers, each
    rank keeps its own BatchNorm statistics: none are broadcast in forward."""
    return DDP(module, device_ids=[env.device.index] if env.device.type == "cuda" else None,
               gradient_as_bucket_view=True, **({} if buffers else NO_FORWARD_BUFFER_SYNC))


def broadcast_buffers(module):
    """Rank 0's buffers everywhere, so that every rank evaluates the network that rank 0 saves (without
    SyncBatchNorm, each rank's BatchNorm running statistics are its own)."""
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def all_gather_rows(x):
    """Concatenate x from all ranks in rank order (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def raise_together(error, env, elsewhere):
    """Raise error (this rank's UsageError, or None) on every rank once any rank has one; a rank without
    one raises UsageError(elsewhere). A rank that raised alone would leave the others waiting in their
    next collective (under NCCL until its watchdog ends them, 10 minutes later) and its sentence unread."""
    if env.world_size > 1:
        failed = all_reduce(torch.tensor(int(error is not None), device=env.device)).item()
        if failed and error is None:
            error = UsageError(elsewhere)
    if error is not None:
        raise error


def require_same_on_every_rank(env, values):
    """values (name -> int) must be the same on every rank, else every rank raises the same error: ranks
    that read different folders (an --out-dir or a copy of the data local to each node) would resume from
    different steps or train on different images, and diverge without a word."""
    if env.world_size == 1:
        return
    mine = torch.tensor(list(values.values()), dtype=torch.long, device=env.device)
    extremes = all_reduce(torch.cat([mine, -mine]), op=dist.ReduceOp.MAX).tolist()  # the maxima, then -minima
    differ = [name for name, high, low in zip(values, extremes, extremes[len(values):]) if high != -low]
    if differ:
        raise UsageError(f"the ranks differ in {' and '.join(differ)}: every rank must read the same --out-dir and "
                         "the same data (on several nodes, from a file system they share).")


def on_main_rank(env, what, fn, *args):
    """fn(*args) on rank 0 alone (what it does: "write the checkpoint"); a UsageError it raises is raised
    on every rank (raise_together)."""
    error = None
    if env.is_main:
        try:
            fn(*args)
        except UsageError as e:
            error = e
    raise_together(error, env, f"rank 0 could not {what} (its error says why).")


def in_turns(load):
    """load() in one process; under torchrun first on rank 0, then on the first rank of every other
    node, then on the other ranks, so that a download is made once whether the nodes share the folder
    it writes to or not, and the others read what it left. An error is raised after the last turn."""
    if not (dist.is_available() and dist.is_initialized()):
        return load()
    turn = 0 if dist.get_rank() == 0 else 1 if int(os.environ.get("LOCAL_RANK", 0)) == 0 else 2
    result = error = None
    for t in range(3):
        if t == turn:
            try:
                result = load()
            except UsageError as e:  # raised once no rank waits on this one in a barrier
                error = e
        dist.barrier(group=_CONTROL)
    if error is not None:
        raise error
    return result


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ------------------------------------------------------------------------------------------------
# Stop signals
# ------------------------------------------------------------------------------------------------

STOP_SIGNALS = []  # SIGTERM / SIGINT received while deferred; the training loops save and exit at the next step


def defer_stop_signals():
    """From here on, SIGTERM and SIGINT only ask the training loop to save and stop after the current
    step (run_main hands the handlers back). Before the loop they act at once: a run stopped while it
    lists its data or waits for its peers has nothing to save.

    A signal the process was started with ignored stays ignored, as Python and the shell have it: a
    job that a script starts in the background (`mdra.py ... &`) ignores SIGINT, so that a Ctrl-C
    meant for the foreground does not stop it; SIGTERM still does."""
    STOP_SIGNALS.clear()
    for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, lambda signum, frame: STOP_SIGNALS.append(signum))


def stop_requested(group=None):
    """True on every rank once any rank got SIGTERM or SIGINT (group: a gloo group, no GPU sync)."""
    flag = torch.tensor([len(STOP_SIGNALS)])
    if group is not None:
        dist.all_reduce(flag, group=group)
    return bool(flag.item())


def exit_if_stop_requested(control, save, log, step, ckpt_path):
    """After an optimizer step of a training loop: once any rank got SIGTERM or SIGINT, save the
    checkpoint and exit with status 128 + the signal."""
    if stop_requested(control):
        save()
        log.print(f"stopped by a signal at step {step}; checkpoint: {Path(ckpt_path).resolve()}")
        sys.exit(128 + (STOP_SIGNALS[0] if STOP_SIGNALS else signal.SIGTERM))


def raise_if_nonfinite(nonfinite, since, step, ckpt_path, prog, hint=""):
    """Stop the run if any rank's loss was non-finite since step `since`. nonfinite is a flag kept on
    the device; reading it is a host sync, so the loops call this only when they log or save."""
    if all_reduce(nonfinite.int(), op=dist.ReduceOp.MAX).item():
        last = ckpt_path if Path(ckpt_path).exists() else "none: none was written yet"
        raise SystemExit(f"{prog}: error: the loss became non-finite between steps {since} and {step}{hint}; "
                         f"the last good checkpoint is {last}.")


# ------------------------------------------------------------------------------------------------
# Logging
# ------------------------------------------------------------------------------------------------

class Logger:
    """Console lines and <out-dir>/log.jsonl, from rank 0 only."""

    def __init__(self, out_dir, active):
        self.active = active
        self.path = Path(out_dir) / "log.jsonl"

    def print(self, *msg):
        if self.active:
            try:
                print(*msg, flush=True)
            except BrokenPipeError:  # the console went away (tee, stopped by the same Ctrl-C, say): train on
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # log.jsonl keeps the record

    def json(self, record):
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def logged_steps(path):
    """The step records of log.jsonl behind the weights a run ends with, in step order. A run's start
    record names the step it began at: a fresh run (step 0) drops what an earlier run left in the
    folder, and a resumed one the steps logged after the checkpoint it resumed from."""
    lines = Path(path).read_text().splitlines() if Path(path).is_file() else []
    records = {}
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short when a run was killed
            continue
        if record.get("event") == "start":  # logs written before start records named a step keep everything
            records = {step: r for step, r in records.items() if step <= record.get("step", math.inf)}
        elif "event" not in record:
            records[record["step"]] = record
    return [records[step] for step in sorted(records)]


def git_sha():
    """The commit of this code, "-dirty" added when tracked files differ from it; "unknown" outside git."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"],
                              cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------
# Files and checkpoints
# ------------------------------------------------------------------------------------------------

CHECKPOINT_VERSION = 1
BACKBONE_KEYS = ("arch", "small_stem", "backbone")  # what a network is built and loaded from (spec section 8)


def plain_state_dict(state_dict):
    """Strip the prefixes DDP ("module.") and torch.compile ("_orig_mod.") add to keys."""
    return {k.removeprefix("module.").replace("_orig_mod.", ""): v for k, v in state_dict.items()}


def plain_values(args):
    """The arguments as plain values, for checkpoints (weights_only loading) and JSON."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def saved_bytes(state):
    """About the size of torch.save(state): the storages of its tensors, each once, as torch.save writes them."""
    storages = {}

    def visit(value):
        if isinstance(value, torch.Tensor):
            storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    visit(state)
    return sum(storages.values())


def out_of_space(error, folder, needed):
    """Whether a write failed for want of space: ENOSPC or EDQUOT in the error's chain or, as torch's zip
    writer reports it as a RuntimeError of its own, less room left in folder than the write still needed."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    try:
        return shutil.disk_usage(folder).free < needed + 2**20  # a margin for the writer's last buffer
    except OSError:
        return False


@contextlib.contextmanager
def atomic_file(path, size):
    """The temporary path to write path's new contents to: once complete and synced it replaces path, so a
    half-written file never replaces a good one. The temporary file is removed whatever goes wrong, and a
    full disk is one sentence (size: about how many bytes the file takes)."""
    path = Path(path)
    # One per writer (two processes never share one), ending as path does: torch.export.save warns about
    # (and means to refuse) a file whose name does not end in .pt2.
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except Exception as e:
        full = out_of_space(e, path.parent, size - (tmp.stat().st_size if tmp.exists() else 0))
        tmp.unlink(missing_ok=True)  # before counting what is free: it would keep the disk full
        if not full:
            raise
        kept = f"; {path} is kept as it was" if path.exists() else ""
        raise UsageError(f"no space left on {path.parent} for {path.name} (needs about {size / 2**20:.1f} MB, "
                         f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MB free){kept}.") from None
    except BaseException:  # a stop signal or Ctrl-C
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(state, path):
    """Write atomically (atomic_file): a half-written file never replaces a good checkpoint."""
    with atomic_file(path, saved_bytes(state)) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)  # into a file object, so that a full disk's ENOSPC stays in the error's chain


def load_checkpoint(path, formats=("mdra",)):
    """Load a checkpoint safely (weights_only) and check its format and version."""
    path = Path(path)
    if path.is_dir():  # a run's --out-dir, most likely
        inside = path / "checkpoint.pth"
        raise UsageError(f"checkpoint {path} is a folder; give the checkpoint file in it, {inside}."
                         if inside.is_file() else f"checkpoint {path} is a folder, not a checkpoint file.")
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise UsageError(f"{path} is not a readable checkpoint ({type(e).__name__}).") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") not in formats:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise WrongFormat(f"{path} has format {found!r}; expected {' or '.join(map(repr, formats))}.", found)
    version = ckpt.get("version", 1)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise UsageError(f"{path} is a version {version} checkpoint and this code reads versions up to "
                         f"{CHECKPOINT_VERSION}; update the code to load it.")
    return ckpt


def require_keys(ckpt, path, keys, writer):
    """A checkpoint of the right format that lacks a key its use reads (a fork's, or one made by hand)
    is refused in one sentence that names them all, rather than by the KeyError of the first."""
    missing = [key for key in keys if key not in ckpt]
    if missing:
        raise UsageError(f"{path} lacks {', '.join(missing)}; it was not written by {writer}.")


def load_strict(module, state_dict, what):
    """load_state_dict that names what does not fit, as one sentence."""
    state_dict = plain_state_dict(state_dict)
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in state_dict if k in own and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{name} keys {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)) if keys]
        raise UsageError(f"{what} does not match the model: {'; '.join(parts)}.")
    module.load_state_dict(state_dict)


def data_fingerprint(names):
    """What a resumed run checks its images against: how many, and a hash of their names in order."""
    return {"images": len(names), "names_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()}


def resumed_state(step, data):
    """What every rank must agree on once it has resumed (require_same_on_every_rank): the step, and the
    images by their data_fingerprint."""
    return {"the step resumed from": step, "the number of images": data["images"],
            "the images' names": int(data["names_sha256"][:15], 16)}


def load_out_dir_checkpoint(path, formats, writer):
    """The checkpoint in --out-dir, refused in a sentence of its own if another script wrote it (finetune.py
    given the pretraining's folder as its --out-dir, say)."""
    try:
        return load_checkpoint(path, formats)
    except WrongFormat as e:
        raise UsageError(f"{path} in --out-dir is not a checkpoint of {writer} (its format is {e.found!r}): "
                         f"give {writer} an --out-dir of its own.") from None


def load_resume_checkpoint(path, args, parser, may_change, formats=("mdra",), data=None, needs=(), writer="mdra.py",
                           retired=None, loaded=None):
    """The checkpoint an earlier run left in --out-dir, refused if any setting but those in may_change
    differs from the run's (the others define the model, the data, the schedule or the seed, so the run
    could not continue as the one it resumes), or if its images (data: their data_fingerprint) did.
    parser: the script's; a setting the checkpoint lacks (a flag newer than it, or one a fork added) ran at
    its default, and one whose default is None is chosen at run time and taken as it is now. A setting of
    the checkpoint that the parser no longer has is ignored, unless retired gives the value it must have
    had (one that the code still trains as). needs: the keys the run restores besides those of every
    training checkpoint; writer: the script; loaded: the checkpoint if the caller has read it from path."""
    ckpt = load_out_dir_checkpoint(path, formats, writer) if loaded is None else loaded
    require_keys(ckpt, path, ("args", "step", "optimizer", "scaler", *needs), writer)
    now, defaults = plain_values(args), vars(parser.parse_args([]))
    gone = [f"--{k.replace('_', '-')} {ckpt['args'][k]}" for k, v in (retired or {}).items()
            if ckpt["args"].get(k, v) != v]
    if gone:
        raise UsageError(f"{path} was trained with {', '.join(gone)}, a setting this version no longer has; "
                         "resume it with the version that wrote it.")
    saved = {k: now.get(k) if v is None else v for k, v in defaults.items()}
    saved.update((k, v) for k, v in ckpt["args"].items() if k in defaults)
    changed = [f"--{k.replace('_', '-')} {saved[k]} -> {now.get(k)}"
               for k in sorted(saved) if k not in may_change and saved[k] != now.get(k)]
    if changed:
        raise UsageError(f"{path} comes from a different run ({', '.join(changed)}); "
                         "use another --out-dir or the same settings.")
    saved_data = ckpt.get("data", data)  # checkpoints written before the fingerprint have none
    if saved_data != data:
        then, now = saved_data["images"], data["images"]
        differ = f"{then} then, {now} now" if then != now else f"{now} then and now, under other names"
        raise UsageError(f"{path} comes from a run on other images ({differ}); use another --out-dir or the same images.")
    return ckpt


def restart_from_checkpoint(path, args, parser, may_change, data, batchnorm_batch, modules, optimizer, scaler, env,
                            log, formats=("mdra",), needs=(), writer="mdra.py", retired=None, loaded=None):
    """Resume the run whose checkpoint is at path, if there is one (DINO's restart_from_checkpoint): check that
    it is this run (load_resume_checkpoint, and BatchNorm over as many images), load modules ({key: (module,
    what it is)}) strictly, the optimizer and the scaler. Returns the checkpoint, for the parts the caller
    restores itself, or None for a fresh run. Every rank checks that all resumed the same step on the same
    images (data: their data_fingerprint)."""
    ckpt = None
    if loaded is not None or Path(path).is_file():
        ckpt = load_resume_checkpoint(path, args, parser, may_change, formats, data, (*modules, *needs), writer,
                                      retired, loaded)
        then = ckpt.get("batchnorm_batch", batchnorm_batch)  # checkpoints written before this check have none
        if then != batchnorm_batch:
            raise UsageError(f"{path} was trained with BatchNorm over {then} images at a time and this run would use "
                             f"{batchnorm_batch} (another number of ranks); resume as it ran.")
        for key, (module, what) in modules.items():
            load_strict(module, ckpt[key], f"{what} in {path}")
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty unless the interrupted run used --amp fp16
            scaler.load_state_dict(ckpt["scaler"])
        log.print(f"resumed from {path} at step {ckpt['step']}")
    require_same_on_every_rank(env, resumed_state(ckpt["step"] if ckpt else 0, data))
    return ckpt


def checkpoint_state(fmt, args, step, steps_per_epoch, feature_dim, backbone, optimizer, scaler, info, data,
                     batchnorm_batch, **parts):
    """The checkpoint of a training script (spec section 8): what every format shares, and parts."""
    return {"format": fmt, "version": CHECKPOINT_VERSION, "arch": args.arch, "small_stem": args.small_stem,
            "feature_dim": feature_dim, "args": plain_values(args), "epoch": step // steps_per_epoch, "step": step,
            "backbone": backbone.state_dict(), **parts, "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "mean": list(info.mean), "std": list(info.std), "img_size": args.img_size,
            "data": data, "batchnorm_batch": batchnorm_batch}


def rng_states(device):
    """The random generators' states, kept in a checkpoint for the record: a resumed run needs none of them,
    as its randomness is a function of the seed and the step."""
    return {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}


def save_on_main(env, make_state, path, copy_to=None):
    """Write the checkpoint make_state() on rank 0 (and the same to copy_to, a copy that stays); a full disk is
    one sentence on every rank."""
    def write():
        state = make_state()
        save_checkpoint(state, path)
        if copy_to is not None:
            save_checkpoint(state, copy_to)
    on_main_rank(env, "write the checkpoint", write)


def require_folder(path, flag):
    """An output folder, made if needed and proven writable by a temporary file: a path taken by a file,
    a read-only file system or a folder without permission is one clear error before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {path} cannot be created ({e.strerror}).") from None
    try:
        tempfile.NamedTemporaryFile(dir=path).close()
    except OSError as e:
        raise UsageError(f"{flag} {path} is not writable ({e.strerror}).") from None


HELD_LOCKS = []  # the open lock files of lock_folder; run_main closes them, which releases the locks


def _close_held_locks():
    while HELD_LOCKS:
        HELD_LOCKS.pop().close()


os.register_at_fork(after_in_child=_close_held_locks)  # a loader worker would keep a killed run's lock alive


def lock_folder(path, flag):
    """Refuse a second run on an output folder while one runs in it: an exclusive flock on <path>/run.lock,
    which the kernel releases when the process ends, by kill -9 too, or when run_main returns. The file
    names the holder (pid, host, start, command), so that the refusal can name it."""
    lock = open(Path(path) / "run.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise UsageError(f"{flag} {path} is in use by another run ({holder}); wait for it to end or give another "
                         f"{flag}.") from None
    except OSError as e:  # a file system without locks (some network ones): run, but say what is missing
        lock.close()
        print(f"warning: {flag} {path} cannot be locked ({e.strerror}); a second run on it "
              "at the same time would not be refused.", file=sys.stderr)
        return
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, started {datetime.datetime.now():%Y-%m-%d %H:%M:%S}: "
               f"{shlex.join(sys.argv)}\n")
    lock.flush()
    HELD_LOCKS.append(lock)


def take_out_dir(path, env, flag="--out-dir"):
    """A training run's output folder, made if needed, proven writable and locked by rank 0 (lock_folder)."""
    path = Path(path)
    require_folder(path, flag)
    on_main_rank(env, f"take {flag} {path}", lock_folder, path, flag)
    return path


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def finite_float(text):
    """argparse type: a float that is a number within float32's range; nan, inf or more would reach the
    schedule or the loss."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    if abs(value) > torch.finfo(torch.float32).max:
        raise argparse.ArgumentTypeError(f"{text} is beyond float32's range")
    return value


def seed_int(text):
    """argparse type: a seed below 2**32. torch's CPU generator keeps only the lowest 32 bits of its seed:
    seeds 1 and 2**32 + 1 would draw the same weights."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 2**32 - 1")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it is a value: None means "chosen from the data or the device",
    which the help text says."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def require_at_least(least, args, *names):
    """One clear error for the first of these options that is below least."""
    for name in names:
        if getattr(args, name) < least:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {least}.")


def require_two_classes(num_classes, data, what, hint=""):
    """A classifier or a kNN vote over one class is always right: its 100% would measure nothing."""
    if num_classes < 2:
        raise UsageError(f"{what} needs at least two classes; {data} has {num_classes}, over which every answer "
                         f"is right{hint}.")



# What a resumed run may change of the shared flags: where and how it runs, and how often it logs and saves.
RUN_FLAGS = ("data_dir", "out_dir", "device", "workers", "compile", "compile_backend", "amp", "channels_last",
             "max_steps", "save_every", "log_every")


# The data flags' defaults, which the evaluations fall back to where the checkpoint names no data.
DATA_DEFAULTS = {"data": "fashion-mnist", "data_dir": "data"}


def add_data_flags(group, data_names, from_checkpoint=False):
    """--data, --data-dir and --workers, as every script takes them; from_checkpoint: the data defaults to the
    checkpoint's (the evaluations), else to DATA_DEFAULTS."""
    a = group.add_argument
    default = (lambda name: None) if from_checkpoint else DATA_DEFAULTS.get
    fallback = "; default: the checkpoint's, else {}" if from_checkpoint else ""
    a("--data", default=default("data"),
      help="ImageFolder root (its train/, and val/ to evaluate on) or one of: " + ", ".join(data_names)
           + " (synthetic:N for N images, default 1024)" + fallback.format(DATA_DEFAULTS["data"]))
    a("--data-dir", default=default("data_dir"),
      help="where named data sets are read from or downloaded to" + fallback.format(DATA_DEFAULTS["data_dir"]))
    a("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes per rank")


def add_run_flags(group, out_dir=None):
    """--device, --amp, --channels-last and --seed, as every script takes them; with out_dir (the training
    scripts' default folder), compile, the run's folder, its length and how often it logs and saves."""
    a = group.add_argument
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when a GPU is available")
    a("--amp", default=None, choices=["bf16", "fp16", "off"], help="autocast dtype; default: bf16 on CUDA, off on CPU")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    a("--seed", type=seed_int, default=0,
      help="seeds every random draw: the weights, the data order and subsets, every augmentation")
    if out_dir is None:
        return
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile; default: on for CUDA")
    a("--compile-backend", default="inductor", help="torch.compile backend (aot_eager compiles fast, for tests)")
    a("--out-dir", default=out_dir, help="checkpoint.pth and log.jsonl go here; an existing checkpoint is resumed")
    a("--max-steps", type=int, default=0,
      help="stop after this many optimizer steps in total (resumed ones included); the schedule still follows --epochs")
    a("--save-every", type=int, default=200,
      help="write the checkpoint every this many optimizer steps (and at each epoch end)")
    a("--log-every", type=int, default=20, help="log every this many optimizer steps")


def resolve_speed_flags(args, env):
    """The speed settings left out: on CUDA torch.compile (where the script compiles), bf16 autocast and
    channels_last, with cuDNN's autotuner and TF32 convolutions (matmuls stay exact float32); on the CPU
    none of them."""
    cuda = env.device.type == "cuda"
    if hasattr(args, "compile"):
        args.compile = cuda if args.compile is None else args.compile
        if args.compile and args.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise UsageError(f"--compile-backend {args.compile_backend!r} is not a torch.compile backend "
                             "(e.g. inductor or aot_eager; torch._dynamo.list_backends() names them all).")
    args.amp = args.amp or ("bf16" if cuda else "off")
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = True
    return args


def announce(log, prog, env, args, **record):
    """A run's first lines: the code, the processes, the device and torch, then every argument; and the
    same as the start record of log.jsonl (with record's fields). Returns the git SHA."""
    sha = git_sha()
    cuda = env.device.type == "cuda"
    log.print(f"{prog} git {sha} | world size {env.world_size} | device {env.device}"
              f"{' (' + torch.cuda.get_device_name(env.device) + ')' if cuda else ''} | torch {torch.__version__}")
    log.print("args " + json.dumps(plain_values(args)))
    log.json({"event": "start", "git": sha, "world_size": env.world_size, "device": str(env.device),
              "args": plain_values(args), **record})
    return sha


def autocast(device, amp):
    """The autocast context of --amp on device (a no-op for off)."""
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=AMP_DTYPES[amp] is not None)


class Progress:
    """A training loop's running figures, kept on the device between the host syncs of logging and saving:
    the loss summed since the last log line and over the epoch, and whether any loss was non-finite; on
    the host, the time and the wait for data since the last log line. A resumed run takes the epoch's loss
    so far from its checkpoint (ckpt), so that its epoch record is the mean of all the epoch's steps."""

    def __init__(self, device, step, ckpt=None):
        self.loss = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.logged_step = self.last_saved = step
        self.tic = self.epoch_tic = time.perf_counter()
        self.data_time = 0.0
        saved = (ckpt or {}).get("epoch_loss")  # none in checkpoints from before it was kept
        self.epoch_loss = torch.full((), saved["sum"] if saved else 0.0, device=device)
        self.epoch_from = saved["from"] if saved else step

    def start_epoch(self, step, first_step):
        """An epoch starts at first_step; a run resumed inside it (step > first_step) keeps its loss so far."""
        self.epoch_tic = time.perf_counter()
        if step == first_step:
            self.epoch_loss.zero_()
            self.epoch_from = step

    def add(self, loss):
        self.nonfinite |= ~torch.isfinite(loss)
        self.loss += loss
        self.epoch_loss += loss

    def check_finite(self, since, step, ckpt_path, prog, hint=""):
        raise_if_nonfinite(self.nonfinite, since, step, ckpt_path, prog, hint)

    def window(self, step, items_per_step, last_step, env, ckpt_path, prog, hint=""):
        """The figures of the steps since the last call (every rank's mean loss), then a new window:
        {"loss", "rate" (items/s), "data_wait" (its share of the time), "eta_s", "peak_mem_gb"}."""
        self.check_finite(self.logged_step, step, ckpt_path, prog, hint)
        elapsed, steps = time.perf_counter() - self.tic, step - self.logged_step
        record = {"loss": (all_reduce(self.loss.clone()) / env.world_size / steps).item(),
                  "rate": steps * items_per_step / elapsed, "data_wait": self.data_time / elapsed,
                  "eta_s": elapsed / steps * (last_step - step), "peak_mem_gb": peak_memory_gb(env.device)}
        self.loss.zero_()
        self.tic, self.data_time, self.logged_step = time.perf_counter(), 0.0, step
        return record

    def epoch_state(self, env):
        """The epoch's loss so far over every rank, for the checkpoint (a collective: every rank calls it)."""
        return {"sum": (all_reduce(self.epoch_loss.clone()) / env.world_size).item(), "from": self.epoch_from}

    def epoch_mean(self, step, env):
        return self.epoch_state(env)["sum"] / (step - self.epoch_from)


def timed(batches, progress):
    """The batches, the time spent waiting for each added to progress.data_time."""
    iterator = iter(batches)
    while True:
        t0 = time.perf_counter()
        batch = next(iterator, None)
        progress.data_time += time.perf_counter() - t0
        if batch is None:
            return
        yield batch


def data_loader(dataset, batch_size, workers, device, persistent=True, **kwargs):
    """A DataLoader whose workers ignore stop signals (so that the loop can save), pinned for CUDA, and,
    with persistent, kept across epochs with four batches a worker in flight."""
    persistent = persistent and workers > 0
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=persistent, prefetch_factor=4 if persistent else None,
                      worker_init_fn=ignore_stop_signals, **kwargs)
