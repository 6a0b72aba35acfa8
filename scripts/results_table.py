"""The results table of scripts/reproduce_fashion_mnist.sh, in Markdown, from its output folder;
and, for the script, the learning rate whose trial did best on the held-out training images.

    python3 scripts/results_table.py runs/fashion-mnist
    python3 scripts/results_table.py --best-lr runs/fashion-mnist scratch1 0.3 0.1 0.03 0.01
"""
import json
import math
import sys
from pathlib import Path

# The pretraining rows of reproduce_fashion_mnist.sh (its PRETRAININGS) and what each is; a second seed
# names the row of the first, and is reported with it and their mean.
PRETRAININGS = {
    "mdra": "MDRA (G = 4)",
    "mdra-seed1": "MDRA (G = 4)",
    "mdra-g1": "ablation: relation alignment without subspaces (G = 1)",
    "mdra-g1-seed1": "ablation: relation alignment without subspaces (G = 1)",
    "mdra-nobalance": "ablation: no balance constraint, R a row softmax as in ReSSL (--sinkhorn-iters 0)",
    "mdra-nopredictor": "ablation: no predictor h (--no-predictor)",
    "mdra-nocross": "ablation: no cross alignment, each view with its own relation (--no-cross)",
}
SEEDS = {"mdra-seed1": "mdra", "mdra-g1-seed1": "mdra-g1"}
# The table's blocks: the baselines (row folder, what it is), then the row of every pretraining P that
# uses its backbone, P-<use> (use, what it does, which labels it uses).
BLOCKS = [
    ([("pixels-knn", "raw-pixel kNN (baseline)"), ("random-knn", "random-init ResNet-18 kNN (baseline)")],
     ("knn", " kNN", "all, kNN")),
    ([("scratch1", "supervised from scratch (baseline)")], ("ft1", ", fine-tuned", "1%")),
    ([("scratch10", "supervised from scratch (baseline)")], ("ft10", ", fine-tuned", "10%")),
    ([], ("linear", ", linear probe (frozen backbone)", "100%")),
    ([], ("hknn", " kNN on held-out training images", "held-out, kNN")),  # chooses settings; not the test split
]
# The rows the script runs by default are listed as "not run" until they have; the others once they have.
DEFAULT_ROWS = {"pixels-knn", "random-knn", "mdra-knn", "mdra-g1-knn", "scratch1", "mdra-ft1", "scratch10",
                "mdra-ft10", "mdra-linear"}


def rows():
    """[(row folder, what it is, which labels it uses, its pretraining or None)], in the table's order."""
    listed = []
    for baselines, (use, does, labels) in BLOCKS:
        listed += [(name, what, labels, None) for name, what in baselines]
        listed += [(f"{p}-{use}", PRETRAININGS[p] + does + (", seed 1" if p in SEEDS else ""), labels, p)
                   for p in PRETRAININGS]
    return listed


def accuracy(folder):
    """(top-1, top-5, epochs of this row, k) from a kNN result (k = 20, else the smallest k it has) or
    a fine-tuning log (k None)."""
    knn = folder / "knn.json"
    if knn.exists():
        record = json.loads(knn.read_text())
        split = "held-out" if folder.name.endswith("-hknn") else "val"  # results written before "eval" are val's
        assert record.get("eval", "val") == split, f"{folder} was not evaluated on the {split} images"
        results = record["results"]
        k = "20" if "20" in results else min(results, key=int)
        return results[k]["top1"], results[k]["top5"], None, k
    last = [r for r in records(folder) if r.get("event") == "epoch"][-1]
    assert last.get("eval", "val") == "val", f"{folder} was not evaluated on the test split"
    return last["top1"], last["top5"], last["epoch"], None


def read_log(path):
    """The records of a log.jsonl behind the weights its run ended with, as runtime.logged_records keeps them: a
    start record names the step its run began at, so a fresh run (step 0) drops what an earlier one left
    in the folder and a resumed one what was logged after its checkpoint; a line cut short when a run was
    killed is skipped."""
    kept = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "start":  # logs written before start records named a step keep everything
            kept = [r for r in kept if r.get("step", 0) <= record.get("step", math.inf)]
        kept.append(record)
    return kept


def records(folder):
    return read_log(folder / "log.jsonl")


def lr_trials(out, name, lrs=None):
    """{lr: (held-out top-1, wall seconds)} of the finished learning-rate trials of a fine-tuning row (of
    lrs, default those the row was chosen from, as its lrs file names them, else all there are); the top-1
    is None for a trial that failed (a rate that diverges)."""
    if lrs is None and (out / name / "lrs").exists():
        lrs = (out / name / "lrs").read_text().split()
    trials = {}
    for folder in sorted((out / "lr-trials").glob(f"{name}-lr*")):
        lr = folder.name[len(name) + 3:]
        if lrs is not None and lr not in lrs:
            continue
        if (folder / "time_s").exists():
            last = [r for r in records(folder) if r.get("event") == "epoch"][-1]
            assert last["eval"] == "held-out", f"{folder} was not evaluated on held-out images"
            trials[lr] = (last["top1"], int((folder / "time_s").read_text()))
        elif (folder / "failed").exists():
            trials[lr] = (None, int((folder / "elapsed_s").read_text()))
    return trials


def best_lr(out, name, lrs):
    """The learning rate of lrs with the best held-out top-1 (the first of equals), among the trials
    that did not fail."""
    trials = lr_trials(Path(out), name, lrs)
    scored = [lr for lr in lrs if lr in trials and trials[lr][0] is not None]
    if not scored:
        sys.exit(f"results_table.py: every learning-rate trial of {name} ({' '.join(lrs)}) failed.")
    return max(scored, key=lambda lr: (trials[lr][0], -lrs.index(lr)))


def learning_rate(out, name):
    """The row's learning rate, and the held-out top-1 of each trial it was chosen from."""
    start = next((r for r in reversed(records(out / name)) if r.get("event") == "start"), None)
    if start is None or "lr" not in start["args"]:
        return "–"
    chosen, trials = start["args"]["lr"], lr_trials(out, name)
    if not trials:
        return f"{chosen:g}"
    tried = ", ".join(f"{lr}: " + ("failed" if top1 is None else f"{top1:.2f}")
                      for lr, (top1, _) in sorted(trials.items(), key=lambda t: -float(t[0])))
    return f"{chosen:g} (held-out top-1 {tried}; trials {sum(s for _, s in trials.values())} s)"


def pretraining_epochs(folder):
    return max((r["epoch"] for r in records(folder) if r.get("event") == "epoch"), default=0)


def row_cells(out, name, pretraining):
    """(top-1, top-5, k, the epochs, lr, wall time, hardware, command) of a finished row."""
    folder = out / name
    top1, top5, epochs, k = accuracy(folder)
    lr = learning_rate(out, name) if (folder / "log.jsonl").exists() else "–"
    seconds = int((folder / "time_s").read_text())
    epoch_text = f"{epochs} fine-tuning" if epochs else ""
    if pretraining:
        pre = out / pretraining
        seconds_pre = int((pre / "time_s").read_text())
        epoch_text = f"{pretraining_epochs(pre)} pretraining" + (f" + {epoch_text}" if epoch_text else "")
        time_text = f"{seconds_pre} s + {seconds} s"
    else:
        time_text = f"{seconds} s"
    command = (folder / "command").read_text().strip()
    hardware = (folder / "hardware").read_text().strip()
    return top1, top5, k, epoch_text, lr, time_text, hardware, command


def text(path):
    """A record file's text, "?" where the row left none."""
    return path.read_text().strip() if path.exists() else "?"


def main(out):
    out = Path(out)
    lines = ["| row | labels | top-1 | top-5 | epochs | lr | wall time | hardware | command |",
             "| --- | --- | ---: | ---: | --- | --- | ---: | --- | --- |"]
    done = {name: row_cells(out, name, p) for name, _, _, p in rows() if (out / name / "time_s").exists()}
    for name, what, labels, pretraining in rows():
        if name not in done:
            if (out / name / "failed").exists():  # its output.log says why (a RESULTS copy keeps no output)
                lines.append(f"| {what} | {labels} | failed | | | | | {text(out / name / 'hardware')} | "
                             f"`{text(out / name / 'command')}` |")
            elif name in DEFAULT_ROWS:
                lines.append(f"| {what} | {labels} | not run | | | | | | |")
            continue
        top1, top5, k, epoch_text, lr, time_text, hardware, command = done[name]
        if k not in (None, "20"):
            labels += f" (k = {k})"
        lines.append(f"| {what} | {labels} | {top1:.2f} | {top5:.2f} | {epoch_text} | {lr} | {time_text} | {hardware} | `{command}` |")
        first = SEEDS[pretraining] + name[len(pretraining):] if pretraining in SEEDS else None
        if first in done:  # the second seed: both seeds' mean, and how far apart they are
            (a1, a5, _, a_epochs, *_), (b1, b5, *_) = done[first], done[name]
            what = what.removesuffix(", seed 1")
            epochs = a_epochs if a_epochs == epoch_text else f"{a_epochs} / {epoch_text}"
            lines.append(f"| {what}, mean of seeds 0 and 1 | {labels} | {(a1 + b1) / 2:.2f} (spread {abs(a1 - b1):.2f}) "
                         f"| {(a5 + b5) / 2:.2f} | {epochs} | – | | | |")
    for name in PRETRAININGS:
        folder = out / name
        if (folder / "time_s").exists():
            lines.append(f"\nPretraining `{name}` ({pretraining_epochs(folder)} epochs, {int((folder / 'time_s').read_text())} s, "
                         f"{text(folder / 'hardware')}): `{text(folder / 'command')}`")
        elif (folder / "failed").exists():
            lines.append(f"\nPretraining `{name}` failed ({text(folder / 'hardware')}): `{text(folder / 'command')}`")
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--best-lr"]:
        print(best_lr(sys.argv[2], sys.argv[3], sys.argv[4:]))
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "runs/fashion-mnist")
