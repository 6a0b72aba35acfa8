"""finetune.py's training rate fed by the CPU loader against --gpu-aug (the labelled images held on the
device, their crops and flips made there in batches), for the linear probe and for fine-tuning.

    python benchmarks/bench_finetune.py --preset h100        # on one GPU: Fashion-MNIST, all labels, 256 a batch
    python benchmarks/bench_finetune.py                      # the CPU preset: synthetic images, toy sizes

Each run is finetune.py itself, on CUDA as its own process (the loader's workers, the device's memory,
a crash and --time-limit stay with it; --isolate), on the CPU in this one (it spares each run seconds of
imports), from random weights (the rate does not depend on them), uncompiled (the data path is what is
compared, and a compilation would eat the run), for --steps steps inside its first epoch (no evaluation).
Its rate and its wait for data are read from its log.jsonl over the log windows after the first, which
holds the start. Rows: images/s and the share of the time waited for data, and each path
against the loader in the same mode and call. --out keeps table.md, results.jsonl and each run's log.
"""
import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import run_script, steady_state  # noqa: E402  (its own folder, then the repository)
import finetune  # noqa: E402  (the repository root is on the path from bench_train on)

PATHS = {"loader": ["--no-gpu-aug"], "gpu-aug": ["--gpu-aug"]}
MODES = {"linear probe": ["--linear"], "fine-tuning": []}
PRESETS = {
    "cpu": dict(device="cpu", data="synthetic", size_flags=["--synthetic-size", "64", "--img-size", "16"],
                batch_size=8, steps=6, log_every=2, workers=1),
    "h100": dict(device="cuda", data="fashion-mnist", size_flags=[], batch_size=256, steps=90, log_every=30,
                 workers=15),
}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default="cpu", help="the defaults of the flags below")
    a("--device", choices=["cpu", "cuda"])
    a("--data", help="an in-memory data set finetune.py names (fashion-mnist, cifar10, ..., synthetic)")
    a("--data-dir", help="where finetune.py reads it from (its default: data/, else the system's copy)")
    a("--batch-size", type=int)
    a("--steps", type=int, help="steps of each run, inside its first epoch")
    a("--log-every", type=int, help="its log windows; the first is left out")
    a("--workers", type=int, help="the CPU loader's workers")
    a("--time-limit", type=float, default=0, help="seconds for all runs (0: none); a run left without time is a row saying so")
    a("--isolate", action=argparse.BooleanOptionalAction, default=None,
      help="run each finetune.py as its own process, so that its workers, GPU memory, a crash and --time-limit "
           "stay with it; default: on for CUDA")
    a("--out", help="a folder for table.md, results.jsonl and each run's log")
    return p


def measure(args):
    """The rows: each mode on each path, the loader first; a failure is a row saying why."""
    common = ["--random-init", "--arch", "resnet18", "--data", args.data, *args.size_flags, "--label-fraction", "1.0",
              "--epochs", "1", "--max-steps", str(args.steps), "--log-every", str(args.log_every),
              "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", args.device,
              "--no-compile"] + (["--data-dir", args.data_dir] if args.data_dir else [])
    rows, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mdra_bench_finetune_") as tmp:
        for mode, mode_flags in MODES.items():
            for path, path_flags in PATHS.items():
                row = dict(mode=mode, path=path)
                rows.append(row)
                left = args.time_limit - (time.perf_counter() - started) if args.time_limit else None
                if left is not None and left <= 0:
                    row["note"] = "skipped: no --time-limit left"
                    continue
                out_dir = Path(tmp) / f"{mode.replace(' ', '-')}_{path}"
                try:
                    argv = [*common, *mode_flags, *path_flags, "--out-dir", str(out_dir)]
                    records = run_script(finetune, argv, out_dir, args.isolate, left)
                    rate, wait, timed = steady_state(records, args.batch_size, "images_per_s", "finetune.py")
                    row.update(images_per_s=rate, data_wait=wait, note=f"{timed} of {args.steps} steps timed")
                except Exception as e:  # a crash, or past the time limit: the row says so and the rest go on
                    row["note"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                if args.out:
                    kept = Path(args.out) / out_dir.name
                    kept.mkdir(parents=True, exist_ok=True)
                    for name in ("log.jsonl", "console.txt"):
                        if (out_dir / name).exists():
                            shutil.copy(out_dir / name, kept / name)
    for row in rows:
        loader = next(r for r in rows if (r["mode"], r["path"]) == (row["mode"], "loader"))
        if "images_per_s" in row and "images_per_s" in loader:
            row["vs"] = f"{row['images_per_s'] / loader['images_per_s']:.2f}x loader"
    return rows


def table(rows, args):
    lines = [f"finetune.py, {args.data}, resnet18, {args.batch_size} a batch, {args.device}, loader with "
             f"{args.workers} workers:", "",
             "| mode | path | images/s | data wait | vs | note |", "|---|---|---|---|---|---|"]
    for row in rows:
        rate = f"{row['images_per_s']:.0f}" if "images_per_s" in row else ""
        wait = f"{100 * row['data_wait']:.0f}%" if "data_wait" in row else ""
        lines.append(f"| {row['mode']} | {row['path']} | {rate} | {wait} | {row.get('vs', '')} | {row.get('note', '')} |")
    return "\n".join(lines)


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.isolate = args.device == "cuda" if args.isolate is None else args.isolate
    rows = measure(args)
    text = table(rows, args)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.md").write_text(text + "\n")
        (out / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
