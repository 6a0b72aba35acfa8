"""Everything the CUDA defaults are chosen from, in one call and one file.

On a machine with a GPU, from the repository root:

    python benchmarks/device_check.py          # writes runs/device_check/device_check.md (--out)

runs, each part as its own process under its own time budget (stopped when it runs past it):
- the device augmentation's tests on this machine's torch and torchvision (tests/test_gpu_aug.py), then
  the tests that need CUDA (tests/test_cuda.py, skipped on a CPU), in at most --tests-time seconds;
- bench_train.py with its h100 preset, in what is left of --time-limit, its own --time-limit (40 s less)
  skipping what would not fit, the compilations first: its loss section (mdra_loss forward and backward,
  eager against compiled, at B 64 and B 512 x N 65536 and at the small-data B 256 x N 4096, G 4), its
  parts section (the LARS step, the EMA update and the queue write, eager against compiled) and its paths
  section: mdra.py on each of its paths (each --compile choice, the views made on the device, both)
  against the reference (eager, the CPU loader), end to end on Fashion-MNIST and on synthetic images at
  three sizes, and the host operations per optimizer step.
The file holds the environment, the tests' summary and the table, or how a part ended, and a verdict:
the compiled speed-up of the loss and of each part, each group's fastest path and fastest --compile
choice. Beside it: each part's output (tests.txt, bench.txt) and bench_train.py's folder, bench/ (its
full log, results.jsonl, each run's log.jsonl).

    python benchmarks/device_check.py --toy    # the same on the CPU at toy sizes, in seconds (its time
                                               # limit leaves the compilations out)

is what tests/test_bench_train.py runs. Fashion-MNIST is read as mdra.py reads it: from --data-dir
(default data/), else the system's copy; a machine without either gets a row saying so.
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_gpu_aug.py", "tests/test_cuda.py"]  # the quick ones first: a run past its budget keeps them
BENCH = ["--preset", "h100", "--sections", "loss", "parts", "paths"]
TOY_TESTS = ["tests/test_bench_train.py", "-k", "host_ops_counts"]
TOY_BENCH = ["--preset", "cpu", "--sections", "loss", "parts", "paths", "--loss-cases", "8:32", "--archs",
             "resnet10-w8", "--path-cases", "resnet10-w8:8:2:1", "--fmnist-case", "resnet10-w8:8:2:1",
             "--host-ops-case", "resnet10-w8:8:2", "--host-ops-steps", "1", "--workers", "0", "--hidden-dim", "32"]
MARGIN_S = 40  # between bench_train.py's own --time-limit and its part's budget: its last row and table


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy", action="store_true", help="on the CPU at toy sizes")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/device_check",
                   help="folder of device_check.md (default: $OUT, else runs/device_check)")
    p.add_argument("--time-limit", type=int, help="seconds for the whole call (default: 1200, --toy 120)")
    p.add_argument("--tests-time", type=int, default=180, help="seconds for the tests, out of --time-limit")
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
    """What the CUDA defaults are chosen from, out of bench_train.py's results.jsonl: the compiled speed-up of
    the loss and of each part of the step; the fastest path of each group of the paths rows, against the
    reference, with the share of its time it waited for data, and the fastest --compile choice (of the
    paths that differ in nothing else: the CPU loader's)."""
    lines = []
    for row in rows:
        if row.get("section") not in ("loss", "parts") or row.get("mode") != "compiled":
            continue
        if "speedup" not in row:  # skipped or failed, or its eager row failed
            lines.append(f"- {row['case']}: compiled: {row.get('note')}")
            continue
        match = {True: "matches eager", False: "DIFFERS from eager"}.get(row.get("matches_eager"), "not compared")
        lines.append(f"- {row['case']}: compiled {row['speedup']:.2f}x eager, compile {row['compile_s']:.0f} s, "
                     f"{match}")
    rows = [row for row in rows if row.get("section") == "paths"]
    for group in dict.fromkeys(row["group"] for row in rows):
        key = "host_ops" if group.startswith("host ops") else "pairs_per_s"
        measured = {row["path"]: row for row in rows if row["group"] == group and key in row}
        if not measured:
            lines.append(f"- {group}: nothing measured")
            continue
        ops = key == "host_ops"
        pick, best_word = (min, "fewest operations") if ops else (max, "fastest")
        best = pick(measured.values(), key=lambda row: row[key])
        reference = measured.get("reference")
        line = (f"- {group}: {best_word}: {best['path']}, {best[key]:.4g} {'per step' if ops else 'pairs/s'}, "
                + (f"{best[key] / reference[key]:.2f}x the reference" if reference else "no reference measured")
                + (f", waited for data {100 * best['data_wait']:.0f}%" if "data_wait" in best else ""))
        choices = [row for row in measured.values() if not row.get("gpu_aug")]
        if len(choices) > 1:
            choice = pick(choices, key=lambda row: row[key])
            line += (f"; {best_word} --compile: {choice['compile']}"
                     + (f", {choice[key] / reference[key]:.2f}x the reference" if reference else ""))
        lines.append(line)
    return lines or ["- nothing measured"]


def tail(path, lines):
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


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
    total = args.time_limit or (120 if args.toy else 1200)
    out = Path(args.out).resolve()  # the parts run in the repository root
    out.mkdir(parents=True, exist_ok=True)
    tests = args.tests or (TOY_TESTS if args.toy else TESTS)
    bench = (TOY_BENCH if args.toy else BENCH) + ["--out", str(out / "bench")]
    bench += ["--data-dir", args.data_dir] if args.data_dir else []
    shutil.rmtree(out / "bench", ignore_errors=True)  # no table of an earlier call passes for this one's
    started = time.perf_counter()
    lines = ["# Device check", "", environment(), "",
             f"command: python benchmarks/device_check.py {shlex.join(sys.argv[1:] if argv is None else argv)}"]

    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests]
    ended = run_part(command, min(args.tests_time, total), out / "tests.txt")
    lines += ["", "## Tests", "", f"`{shlex.join(command[1:])}`: {ended}", "", "```", tail(out / "tests.txt", 40),
              "```"]

    budget = max(round(total - (time.perf_counter() - started)), MARGIN_S + 1)
    command = [sys.executable, "benchmarks/bench_train.py", *bench, "--time-limit", str(budget - MARGIN_S)]
    ended = run_part(command, budget, out / "bench.txt")
    lines += ["", "## Loss, parts and paths", "", f"`{shlex.join(command[1:])}`: {ended}", ""]
    table = out / "bench" / "table.md"
    lines += [table.read_text().strip()] if table.exists() else ["no table; the end of its output:", "", "```",
                                                                  tail(out / "bench.txt", 40), "```"]
    results = out / "bench" / "results.jsonl"
    if results.exists():
        lines += ["", "## Verdict", ""] + verdict([json.loads(line) for line in results.read_text().splitlines()])
    lines += ["", f"total {time.perf_counter() - started:.0f} s"]
    (out / "device_check.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'device_check.md'}")


if __name__ == "__main__":
    main()
