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
    stop signal exit status 128 + the signal: at once before a training loop (the run's temporary files and
    a lock it just made removed), at the end of its step once the loop deferred it (defer_stop_signals)."""
    args = parser.parse_args(argv)
    STOP_SIGNALS.clear()
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNAL_NUMBERS}
    for sig in (signal.SIGTERM, signal.SIGHUP):  # as Python's SIGINT handler does: an exception, so clean-ups run
        if previous[sig] is signal.SIG_DFL:
            signal.signal(sig, stop_now)
    stdout_errors = getattr(sys.stdout, "errors", None)
    if hasattr(sys.stdout, "reconfigure"):  # file names that the file system allows but UTF-8 does not
        sys.stdout.reconfigure(errors="backslashreplace")
    # Only the message is kept: the traceback would keep the loaders, and their workers, alive.
    message, status, finished = None, 0, False
    try:
        result = train_fn(args)
        finished = True
    except UsageError as e:
        message, status = f"error: {e}", 2
    except KeyboardInterrupt:
        message, status = "interrupted", 128 + signal.SIGINT
    except Stopped as e:
        message, status = f"stopped by {signal.Signals(e.signum).name}", 128 + e.signum
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
        _close_held_locks(failed=not finished)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(errors=stdout_errors)
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
    """Data-loading workers ignore the stop signals: schedulers signal the whole process group (a dropped SSH
    session its SIGHUP), and the training loop must outlive its workers long enough to save a checkpoint."""
    for sig in STOP_SIGNAL_NUMBERS:
        signal.signal(sig, signal.SIG_IGN)


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


def sync_bn(env):
    """SyncBatchNorm with more than one CUDA rank; on the CPU, gloo cannot synchronise it."""
    return env.device.type == "cuda" and env.world_size > 1


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

STOP_SIGNAL_NUMBERS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # SIGHUP: what a dropped SSH session sends
STOP_SIGNALS = []  # stop signals received while deferred; the training loops save and exit at the next step


class Stopped(BaseException):
    """SIGTERM or SIGHUP before a training loop defers them: the run ends at once, through its clean-ups."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def stop_now(signum, frame):
    raise Stopped(signum)


def defer_stop_signals():
    """From here on, SIGTERM, SIGINT and SIGHUP only ask the training loop to save and stop after the current
    step (run_main hands the handlers back). Before the loop they act at once: a run stopped while it
    lists its data or waits for its peers has nothing to save.

    A signal the process was started with ignored stays ignored, as Python and the shell have it: a
    job that a script starts in the background (`mdra.py ... &`) ignores SIGINT, so that a Ctrl-C
    meant for the foreground does not stop it; SIGTERM still does."""
    STOP_SIGNALS.clear()
    for sig in STOP_SIGNAL_NUMBERS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, lambda signum, frame: STOP_SIGNALS.append(signum))


def stop_requested(group=None):
    """True on every rank once any rank got a stop signal (group: a gloo group, no GPU sync)."""
    flag = torch.tensor([len(STOP_SIGNALS)])
    if group is not None:
        dist.all_reduce(flag, group=group)
    return bool(flag.item())


def exit_if_stop_requested(control, save, log, step, ckpt_path):
    """After an optimizer step of a training loop: once any rank got a stop signal, save the checkpoint and
    exit with status 128 + the signal."""
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
    """Console lines and <out-dir>/log.jsonl, from rank 0 only. A log.jsonl that this project did not write is
    refused, not added to."""

    def __init__(self, out_dir, active):
        self.active = active
        self.path = Path(out_dir) / "log.jsonl"
        if active:
            require_replaceable(self.path, "--out-dir's", is_log, "a log.jsonl of this project")

    def print(self, *msg):
        if self.active:
            try:
                print(*msg, flush=True)
            except BrokenPipeError:  # the console went away (tee, stopped by the same Ctrl-C, say): train on
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # log.jsonl keeps the record

    def json(self, record):
        if self.active:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # the out-dir deleted or replaced while the run writes
                raise UsageError(f"cannot write {self.path} ({e.strerror}); the run's folder changed under it.") from None


def is_log(path):
    """Whether path begins as every log.jsonl of this project: with a run's start record."""
    with open(path, "rb") as f:
        first = f.readline(1 << 16)
    try:
        return json.loads(first).get("event") == "start"
    except (ValueError, AttributeError):
        return False


def logged_records(path):
    """The records of log.jsonl behind the weights a run ends with, in the order written. A run's start
    record names the step it began at: a fresh run (step 0) drops what an earlier run left in the folder,
    and a resumed one what was logged after the checkpoint it resumed from."""
    records = []
    for line in Path(path).read_text(errors="replace").splitlines() if Path(path).is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short when a run was killed
            continue
        if not isinstance(record, dict) or "step" not in record:  # a line of someone else's
            continue
        if record.get("event") == "start":
            records = [r for r in records if r["step"] <= record["step"]]
        else:
            records.append(record)
    return records


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
    # One per writer (two processes never share one), naming it (remove_debris), ending as path does:
    # torch.export.save warns about (and means to refuse) a file whose name does not end in .pt2.
    tmp = path.with_name(f"{path.stem}.{socket.gethostname()}@{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except Exception as e:
        if not path.parent.is_dir():  # deleted while the run wrote
            raise UsageError(f"cannot write {path}: its folder {path.parent} no longer exists.") from None
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
    validate_checkpoint(ckpt, path)
    return ckpt


def _int(v, least=0, below=math.inf):
    return type(v) is int and least <= v < below  # type(): a bool is an int, but no count


def _finite(x, above=-math.inf):
    return type(x) in (int, float) and above < x < math.inf  # NaN fails every comparison


WEIGHT_FIELDS = ("backbone", "online", "offline", "head")
_WEIGHTS = (lambda v, c: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                                     for k, t in v.items()), "a dict of tensors by name")
# The fields of a checkpoint (spec section 8) as load_checkpoint checks those present, in this order: name ->
# (whether value v of checkpoint c is valid, what it must be: text, or a function of c). A check that reads
# another field comes after it (valid then) and passes where it is absent: require_keys refuses that.
CHECKPOINT_FIELDS = {
    "arch": (lambda v, c: isinstance(v, str), "a string"),
    "small_stem": (lambda v, c: isinstance(v, bool), "True or False"),
    "feature_dim": (lambda v, c: _int(v, 1), "an integer >= 1"),
    "args": (lambda v, c: isinstance(v, dict) and all(isinstance(v.get(k, ""), str) for k in ("data", "data_dir")),
             "a dict whose data and data_dir are strings"),
    "epoch": (lambda v, c: _int(v), "an integer >= 0"),
    "step": (lambda v, c: _int(v), "an integer >= 0"),
    **dict.fromkeys(WEIGHT_FIELDS, _WEIGHTS),
    "queue": (lambda v, c: isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 2 and len(v) > 0,
              "a 2-d float tensor"),
    "queue_ptr": (lambda v, c: "queue" not in c or _int(v, 0, len(c["queue"])),
                  lambda c: f"an integer from 0 to {len(c['queue']) - 1}, a row of the queue"),
    "optimizer": (lambda v, c: isinstance(v, dict), "a dict"),
    "scaler": (lambda v, c: v == {} or isinstance(v, dict) and _finite(v.get("scale"), 0)
               and all(map(_finite, v.values()))
               and {"growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"} <= v.keys(),
               "empty or a GradScaler's state of finite numbers"),
    "epoch_loss": (lambda v, c: v is None or isinstance(v, dict) and _finite(v.get("sum"))
                   and _int(v.get("from"), 0, c.get("step", math.inf) + 1),
                   "None or a dict of a finite sum and the step it sums from, at most step"),
    "mean": (lambda v, c: isinstance(v, (list, tuple)) and len(v) == 3 and all(map(_finite, v)),
             "three finite numbers"),
    "std": (lambda v, c: isinstance(v, (list, tuple)) and len(v) == 3 and all(_finite(x, 0) for x in v),
            "three finite numbers > 0"),
    "img_size": (lambda v, c: _int(v, 8), "an integer >= 8, the smallest crop any network processes"),
    "resize": (lambda v, c: "img_size" not in c or _int(v, c["img_size"]),
               lambda c: f"an integer >= img_size ({c['img_size']})"),
    "num_classes": (lambda v, c: _int(v, 2), "an integer >= 2"),
    "class_names": (lambda v, c: "num_classes" not in c or isinstance(v, list) and len(v) == c["num_classes"]
                    and all(isinstance(name, str) for name in v),
                    lambda c: f"a list of num_classes ({c['num_classes']}) strings"),
    "metrics": (lambda v, c: isinstance(v, dict) and (not v or all(_finite(v.get(k))
                                                                   for k in ("epoch", "top1", "top5"))),
                "a dict, empty or with the epoch, top1 and top5"),
    "data": (lambda v, c: isinstance(v, dict) and v.keys() == {"images", "names_sha256"} and _int(v["images"])
             and isinstance(v["names_sha256"], str) and re.fullmatch("[0-9a-f]{64}", v["names_sha256"]),
             "a dict of the number of images and their names' SHA-256"),
    "batchnorm_batch": (lambda v, c: _int(v, 1), "an integer >= 1"),
}


def _described(v):
    """What a checkpoint field is, briefly: its value if short, else its kind and size."""
    if isinstance(v, torch.Tensor):
        return f"a {str(v.dtype).removeprefix('torch.')} tensor of shape {list(v.shape)}"
    sized = next((kind for kind in (dict, list, tuple, str) if isinstance(v, kind)), None)
    text = repr(v) if sized is None or len(v) <= 5 else ""  # no repr of a whole state dict
    if 0 < len(text) <= 60:
        return text
    return f"a {sized.__name__} of length {len(v)}" if sized else f"a {type(v).__name__}"


def validate_checkpoint(ckpt, path):
    """Refuse a checkpoint whose fields (CHECKPOINT_FIELDS) are of the wrong type, size or range, or whose
    weights are not all finite, in one sentence naming the field or the tensors: a hand-edited or foreign
    file fails here, not deep inside a script or, worse, as a silent wrong answer."""
    for field, (valid, must) in CHECKPOINT_FIELDS.items():
        if field in ckpt and not valid(ckpt[field], ckpt):
            raise UsageError(f"{path}: {field} is {_described(ckpt[field])}, "
                             f"not {must(ckpt) if callable(must) else must}.")
    tensors = {f"{field}.{name}": t for field in WEIGHT_FIELDS for name, t in ckpt.get(field, {}).items()}
    tensors.update({"queue": ckpt["queue"]} if "queue" in ckpt else {})
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise UsageError(f"{path} holds non-finite values in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''} "
                         f"({len(bad)} tensor{'s' if len(bad) > 1 else ''}); it cannot be used.")


def is_checkpoint(path, formats):
    """Whether path is a checkpoint of one of formats; only its record is read, not its tensors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("format") in formats
    except Exception:  # torch raises many types for a foreign file
        return False


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
    """What a resumed run checks its images against: how many, and a hash of their names in order (the bytes
    of the file system's names, UTF-8 or not)."""
    return {"images": len(names),
            "names_sha256": hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest()}


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
        load_optimizer(optimizer, ckpt["optimizer"], path)
        if ckpt["scaler"]:  # empty unless the interrupted run used --amp fp16
            scaler.load_state_dict(ckpt["scaler"])
        log.print(f"resumed from {path} at step {ckpt['step']}")
    require_same_on_every_rank(env, resumed_state(ckpt["step"] if ckpt else 0, data))
    return ckpt


def load_optimizer(optimizer, state, path):
    """optimizer.load_state_dict, refused in one sentence where the state is not one of this optimizer: torch
    checks only how many parameters each group has, and a setting of another kind or a momentum of another
    shape would fail at the first step, a non-finite one make every weight NaN."""
    def kinds(group):
        return {k: "number" if type(v) in (int, float) else type(v) for k, v in group.items() if k != "params"}
    own = [kinds(group) for group in optimizer.param_groups]
    try:  # a state that is not a dict by parameter, or of another number of parameters, fails in here
        optimizer.load_state_dict(state)
        tensors = [(p, t) for p, s in optimizer.state.items() for t in s.values() if isinstance(t, torch.Tensor)]
        fits = (all(t.dim() == 0 or t.shape == p.shape for p, t in tensors)
                and all(mine.items() <= kinds(group).items() for mine, group in zip(own, optimizer.param_groups)))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        fits = False
    if not fits:
        raise UsageError(f"{path}: optimizer is not a state of this run's optimizer (another network's or "
                         "optimizer's); it cannot be resumed.")
    numbers = [v for group in optimizer.param_groups for v in group.values() if type(v) in (int, float)]
    if not (all(map(math.isfinite, numbers))
            and all(torch.isfinite(t).all() for _, t in tensors if t.is_floating_point())):
        raise UsageError(f"{path}: optimizer holds non-finite values; it cannot be resumed.")


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
    a read-only file system or a folder without permission is one clear error before any work. Returns
    whether it was made here."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder.")
    made = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {path} cannot be created ({e.strerror}).") from None
    try:
        tempfile.NamedTemporaryFile(dir=path).close()
    except OSError as e:
        raise UsageError(f"{flag} {path} is not writable ({e.strerror}).") from None
    return made


def require_replaceable(path, flag, ours, what, inputs=()):
    """An output file may be written only where none is, or over one this tool wrote (ours(path): known by its
    content) that is not one of its inputs; anything else is one sentence naming it, before any work. what:
    what ours recognises, for the sentence."""
    path = Path(path)
    if any(path.exists() and Path(given).exists() and os.path.samefile(path, given) for given in inputs):
        raise UsageError(f"{flag} {path} is also what this run reads; it is not written over: give another path.")
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name.")
    try:
        foreign = path.exists() and not (path.is_file() and ours(path))
    except OSError:  # unreadable: not to be replaced either
        foreign = True
    if foreign:
        raise UsageError(f"{flag} {path} exists and is not {what}; it is not written over: give another path or "
                         "move it away.")


HELD_LOCKS = []  # (open lock file, its path if this run made it, its folder if this run made it), from lock_folder


def _close_held_locks(failed=False):
    """Release the locks (run_main, at a run's end); after a failed start, remove the lock file and the folder
    that the run made and left with nothing else in them."""
    while HELD_LOCKS:
        lock, made_file, made_folder = HELD_LOCKS.pop()
        lock.close()
        try:
            if failed and made_file and [p.name for p in made_file.parent.iterdir()] == ["run.lock"]:
                made_file.unlink()
                if made_folder:
                    made_folder.rmdir()
        except OSError:  # the folder went away or changed meanwhile: nothing of this run's to remove
            pass


os.register_at_fork(after_in_child=_close_held_locks)  # a loader worker would keep a killed run's lock alive


def lock_folder(path, flag, made_folder=False):
    """Refuse a second run on an output folder while one runs in it: an exclusive flock on <path>/run.lock,
    which the kernel releases when the process ends, by kill -9 too, or when run_main returns. The file
    names the holder (pid, host, start, command), so that the refusal can name it. made_folder: whether the
    run made path (a failed start removes it again)."""
    lock_path = Path(path) / "run.lock"
    require_replaceable(lock_path, f"{flag}'s", lambda p: p.stat().st_size == 0 or LOCK_RECORD.match(p.read_text(
        errors="replace")), "a run.lock of this project")
    made = not lock_path.exists()
    lock = open(lock_path, "a+", errors="surrogateescape")  # a command line of any bytes
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
    HELD_LOCKS.append((lock, lock_path if made else None, Path(path) if made_folder else None))


LOCK_RECORD = re.compile(r"pid \d+ on .*, started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: ")
TEMPORARY = re.compile(r"\.(?:(?P<host>[^/]+)@)?(?P<pid>\d+)\.tmp(\.[^.]+)?$")  # atomic_file's; no host before


def take_out_dir(path, env, data=None, copies=(), flag="--out-dir"):
    """A training run's output folder, made if needed, proven writable and locked by rank 0 (lock_folder),
    which then removes the temporary files of runs killed while they wrote there. data: the ImageFolder
    the run reads (None for a named data set), inside which it writes nothing; copies: the formats of the
    checkpoint_epochNNNN.pth copies it may write over (mdra.py --keep-every), only checkpoints of its own."""
    path = Path(path)
    require_outside(path, data, flag)
    made = require_folder(path, flag)
    on_main_rank(env, f"take {flag} {path}", lock_folder, path, flag, made)
    if env.is_main:
        remove_debris(path)
    for kept in path.glob("checkpoint_epoch*.pth") if copies else ():
        require_replaceable(kept, f"{flag}'s", lambda p: is_checkpoint(p, copies), f"a checkpoint of {copies[0]}.py")
    return path


def require_outside(path, folder, flag):
    """Nothing the tools make lands among the user's images: path must not be inside folder (an ImageFolder
    the run reads; None for a named data set)."""
    if folder is not None and Path(folder).is_dir() and Path(folder).resolve() in (Path(path).resolve(),
                                                                                   *Path(path).resolve().parents):
        raise UsageError(f"{flag} {path} is inside the images of --data {folder}; give a path outside them.")


def remove_debris(folder):
    """Remove the temporary files (atomic_file's) that processes of this host, no longer alive, left in
    folder; never a live process's."""
    for tmp in Path(folder).glob("*.tmp*"):
        found = TEMPORARY.search(tmp.name)
        if found and found["host"] in (None, socket.gethostname()) and not alive(int(found["pid"])):
            tmp.unlink(missing_ok=True)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


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
    a("--workers", type=int, default=min(8, os.cpu_count() or 1),
      help="data-loading processes per rank; default: one per CPU core, at most 8 (here %(default)s)")


def add_run_flags(group, out_dir=None, compile_choices=("none", "all"), compile_help=""):
    """--device, --amp, --channels-last and --seed, as every script takes them; with out_dir (the training
    scripts' default folder), what torch.compile covers (compile_choices: none first, all last), the run's
    folder, its length and how often it logs and saves."""
    a = group.add_argument
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when a GPU is available")
    a("--amp", default=None, choices=["bf16", "fp16", "off"], help="autocast dtype; default: bf16 on CUDA, off on CPU")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    a("--seed", type=seed_int, default=0,
      help="seeds every random draw: the weights, the data order and subsets, every augmentation")
    if out_dir is None:
        return
    a("--compile", nargs="?", const="all", default=None, choices=compile_choices,
      help=f"what torch.compile covers; --compile alone: all{compile_help}")
    a("--no-compile", dest="compile", action="store_const", const="none", help="the same as --compile none")
    a("--compile-backend", default="inductor", help="torch.compile backend (aot_eager compiles fast, for tests)")
    a("--out-dir", default=out_dir, help="checkpoint.pth and log.jsonl go here; an existing checkpoint is resumed")
    a("--max-steps", type=int, default=0,
      help="stop after this many optimizer steps in total (resumed ones included); the schedule still follows --epochs")
    a("--save-every", type=int, default=200,
      help="write the checkpoint every this many optimizer steps (and at each epoch end)")
    a("--log-every", type=int, default=20, help="log every this many optimizer steps")


def resolve_speed_flags(args, env, compile_default=("all", "none")):
    """The speed settings left out: on CUDA bf16 autocast and channels_last, with cuDNN's autotuner and TF32
    convolutions (matmuls stay exact float32), and what torch.compile covers by default (compile_default:
    on CUDA, on the CPU)."""
    cuda = env.device.type == "cuda"
    if hasattr(args, "compile"):
        args.compile = args.compile or compile_default[0 if cuda else 1]
        if args.compile != "none" and args.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
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
