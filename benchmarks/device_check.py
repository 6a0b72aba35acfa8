"""Everything one GPU session should bring back for issue 17, in one call and one file, within 8 minutes.

On the GPU machine, from the repository root:

    python benchmarks/device_check.py          # writes $OUT/device_check.md (without $OUT: runs/device_check/)

runs, each part as its own process under its own time budget (stopped when it runs past it):
- the device augmentation's tests on this machine's torch and torchvision (tests/test_gpu_aug.py), then
  the tests that need CUDA (tests/test_cuda.py, skipped on a CPU: the captured step and one pass against
  the eager step and two passes, JPEGs decoded on the GPU against the CPU loader's, the device path's
  streams), in at most 180 s;
- bench_train.py's paths section at the issue's sizes (each path against today's, on synthetic images
  for resnet18 at 28 px x 256 pairs and resnet50 at 224 px x 64 and x 512 pairs, mdra.py end to end on
  Fashion-MNIST, the host operations per optimizer step), in what is left of 450 s but the last part's,
  its own --time-limit (40 s less) skipping what would not fit: the compilations first;
- bench_finetune.py: finetune.py's linear probe and fine-tuning on Fashion-MNIST fed by the CPU loader
  and by --gpu-aug, in at most 80 s.
The file holds the environment, the tests' summary and the table, or how a part ended, and a verdict:
each group's fastest path and the issue's targets, met or missed. Beside it: each part's output
(tests.txt, paths.txt, finetune.txt) and one archive, bench.tar.gz, of the benchmarks' folder (their full
logs, results.jsonl, each run's log.jsonl): five files in all, as the GPU machine gives back at most 8
files, none more than 2 folders down.

    python benchmarks/device_check.py --toy    # the same on the CPU at toy sizes, in seconds

is what tests/test_bench_train.py runs, so that the script still works when the GPU comes. Fashion-MNIST
is read as mdra.py reads it: from --data-dir (default data/; copy its four .gz files there for a machine
without them), else the system's copy; a machine without either gets a row saying so.
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_gpu_aug.py", "tests/test_cuda.py"]  # the quick ones first: a run past its budget keeps them
PATHS = ["--preset", "h100", "--sections", "paths"]
TOTAL_S, TESTS_S, FINETUNE_S, MARGIN_S = 450, 180, 80, 40  # of the 480 s, the rest for starting and writing
TOY_TESTS = ["tests/test_bench_train.py", "-k", "host_ops_counts"]
TOY_TOTAL_S, TOY_FINETUNE_S = 120, 60
FINETUNE = ["--preset", "h100"]
TOY_FINETUNE = ["--preset", "cpu", "--steps", "4", "--workers", "0"]
TOY_PATHS = ["--preset", "cpu", "--sections", "paths", "--path-cases", "resnet18:8:2:1",
             "--fmnist-case", "resnet18:8:2:1", "--host-ops-case", "resnet18:8:2", "--host-ops-steps", "1",
             "--workers", "0"]


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy", action="store_true", help="on the CPU at toy sizes (what the test runs)")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/device_check",
                   help="folder of device_check.md (default: $OUT, else runs/device_check)")
    p.add_argument("--tests", type=shlex.split, help="pytest's arguments instead of the default selection")
    p.add_argument("--data-dir", help="where mdra.py reads Fashion-MNIST from (bench_train.py --data-dir)")
    return p


def run_part(command, budget, log):
    """Run command under budget seconds, its output in the file log; returns how it ended, in words."""
    t0 = time.perf_counter()
    with open(log, "w") as output, subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                                                    start_new_session=True) as process:
        try:
            status = process.wait(timeout=budget)
        except BaseException as e:  # past its budget, or this script is stopping: stop it with what it started
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if not isinstance(e, subprocess.TimeoutExpired):
                raise
            return f"stopped at its budget of {budget} s"
    return f"exit status {status} after {time.perf_counter() - t0:.0f} s of {budget}"


def verdict(rows):
    """Issue 17's targets against the paths rows of this call (bench_train.py's results.jsonl), and the
    fastest path of each group: what the CUDA defaults are chosen from (issue 17 item 4)."""
    rows = [row for row in rows if row.get("section") == "paths"]
    lines, groups = [], dict.fromkeys(row["group"] for row in rows)

    def ratio(group, path, key):  # path against the reference of group, or None where either is missing
        found = {row["path"]: row for row in rows if row["group"] == group and key in row}
        return found[path][key] / found["reference"][key] if {path, "reference"} <= found.keys() else None

    for group in groups:
        key = "host_ops" if group.startswith("host ops") else "pairs_per_s"
        measured = [row for row in rows if row["group"] == group and key in row]
        if measured:
            best = (min if key == "host_ops" else max)(measured, key=lambda row: row[key])
            against = ratio(group, best["path"], key)
            lines.append(f"- {group}: {'fewest operations' if key == 'host_ops' else 'fastest'}: {best['path']}, "
                         f"{best[key]:.4g} {'per step' if key == 'host_ops' else 'pairs/s'}, "
                         + (f"{against:.2f}x the reference" if against else "no reference measured"))

    def target(text, value, met, detail=""):
        lines.append(f"- target: {text}: " + ("not measured" if value is None else
                                             f"{value} ({'met' if met else 'missed'}){detail}"))

    fmnist = next((group for group in groups if group.startswith("fashion-mnist")), None)
    fast = ratio(fmnist, "all-new", "pairs_per_s")
    epoch = next((row.get("s_per_epoch") for row in rows if row["group"] == fmnist and row["path"] == "all-new"), None)
    target("Fashion-MNIST end to end, all-new against the reference, at least 3x", None if fast is None else f"{fast:.2f}x",
           fast is not None and fast >= 3,
           f"; {epoch:.2f} s per epoch, 200 epochs in {200 * epoch / 60:.1f} min" if fast and epoch else "")
    r50 = next((group for group in groups if group.startswith("synthetic resnet50") and group.endswith(" b64")), None)
    new = [(ratio(r50, row["path"], "pairs_per_s"), row["path"]) for row in rows
           if row["group"] == r50 and row["path"] != "reference" and "pairs_per_s" in row]
    best = max((pair for pair in new if pair[0] is not None), default=None)
    target("resnet50 at 224 px x 64 pairs, the best new path against the reference, at least 1.5x",
           None if best is None else f"{best[1]} {best[0]:.2f}x", best is not None and best[0] >= 1.5)
    waits = [row["data_wait"] for row in rows if row["path"] == "all-new" and "data_wait" in row]
    target("wait for data under 5% of the step on the all-new path", f"at most {100 * max(waits):.1f}%" if waits else None,
           bool(waits) and max(waits) < 0.05)
    host = next((group for group in groups if group.startswith("host ops")), None)
    ops = ratio(host, "all-new", "host_ops")
    target("host operations per optimizer step of all-new, at most 0.5x the reference", None if ops is None else f"{ops:.2f}x",
           ops is not None and ops <= 0.5)
    return lines


def tail(path, lines):
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def pack(folder):
    """folder as folder.tar.gz beside it, then removed: one file instead of one per run."""
    if folder.exists():
        with tarfile.open(folder.with_name(folder.name + ".tar.gz"), "w:gz") as archive:
            archive.add(folder, arcname=folder.name)
        shutil.rmtree(folder)


def environment():
    gpu = "no nvidia-smi"
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        gpu = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() or "no GPU listed"
    sha = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=REPO, capture_output=True,
                         text=True, timeout=30).stdout.strip() or "unknown"
    return (f"{datetime.datetime.now().isoformat(timespec='seconds')} | git {sha} | GPU: {gpu} | "
            f"{os.cpu_count()} CPUs | python {platform.python_version()}")


def main(argv=None):
    args = get_parser().parse_args(argv)
    out = Path(args.out).resolve()  # the parts run in the repository root
    out.mkdir(parents=True, exist_ok=True)
    tests = args.tests or (TOY_TESTS if args.toy else TESTS)
    bench = (TOY_PATHS if args.toy else PATHS) + ["--out", str(out / "bench")]
    bench += ["--data-dir", args.data_dir] if args.data_dir else []
    shutil.rmtree(out / "bench", ignore_errors=True)  # no table of an earlier call passes for this one's
    (out / "bench.tar.gz").unlink(missing_ok=True)
    started = time.perf_counter()
    lines = ["# Device check (issue 17)", "", environment(), "",
             f"command: python benchmarks/device_check.py {shlex.join(sys.argv[1:] if argv is None else argv)}"]

    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests]
    ended = run_part(command, TESTS_S, out / "tests.txt")
    lines += ["", "## Tests", "", f"`{shlex.join(command[1:])}`: {ended}", "", "```", tail(out / "tests.txt", 40),
              "```"]

    finetune_s = TOY_FINETUNE_S if args.toy else FINETUNE_S
    budget = round((TOY_TOTAL_S if args.toy else TOTAL_S) - finetune_s - (time.perf_counter() - started))
    command = [sys.executable, "benchmarks/bench_train.py", *bench, "--time-limit", str(budget - MARGIN_S)]
    ended = run_part(command, budget, out / "paths.txt")
    lines += ["", "## Paths", "", f"`{shlex.join(command[1:])}`: {ended}", ""]
    table = out / "bench" / "table.md"
    lines += [table.read_text().strip()] if table.exists() else ["no table; the end of its output:", "", "```",
                                                                  tail(out / "paths.txt", 40), "```"]
    results = out / "bench" / "results.jsonl"
    if results.exists():
        lines += ["", "## Verdict", ""] + verdict([json.loads(line) for line in results.read_text().splitlines()])
    command = [sys.executable, "benchmarks/bench_finetune.py", *(TOY_FINETUNE if args.toy else FINETUNE),
               "--out", str(out / "bench" / "finetune"), "--time-limit", str(finetune_s - 10)]
    command += ["--data-dir", args.data_dir] if args.data_dir and not args.toy else []
    ended = run_part(command, finetune_s, out / "finetune.txt")
    finetune_table = out / "bench" / "finetune" / "table.md"
    lines += ["", "## Fine-tuning: the CPU loader against --gpu-aug", "", f"`{shlex.join(command[1:])}`: {ended}", ""]
    lines += [finetune_table.read_text().strip()] if finetune_table.exists() else [
        "no table; the end of its output:", "", "```", tail(out / "finetune.txt", 40), "```"]
    lines += ["", f"total {time.perf_counter() - started:.0f} s"]
    (out / "device_check.md").write_text("\n".join(lines) + "\n")
    pack(out / "bench")
    print(f"wrote {out / 'device_check.md'}")


if __name__ == "__main__":
    main()
