"""The training curves of every pretraining row in a folder of scripts/reproduce_fashion_mnist.sh, in one
PNG: the in-training kNN monitor's top-1 (mdra.py --knn-every; epoch 0, where a log holds it, is the
untrained network), the loss and RankMe against the epoch, each read from the row's log.jsonl.

    python3 scripts/plot_curves.py results/fashion-mnist-h100-80ep          # writes <folder>/curves.png
    python3 scripts/plot_curves.py runs/fashion-mnist --out /tmp/curves.png

This script alone needs matplotlib (pip install matplotlib); the training and evaluation scripts do not.
"""
import argparse
import sys
from pathlib import Path

from results_table import read_log  # beside this file


def curves(log):
    """{"knn": [(epoch, top-1)], "loss": [(epoch, loss)], "rankme": [(epoch, RankMe)]} of one mdra.py log:
    the kNN monitor at k = 20 (else its smallest k), from the epoch records that hold it and from kNN
    records of their own ({"event": "knn", "epoch": E, ...}; epoch 0: the untrained network), each epoch's
    mean loss and the mean RankMe of its logged steps. A resumed run logs again the steps after its last
    checkpoint: the last record counts (of an epoch's kNN, the last that holds one), and what an abandoned
    run left in the folder does not (results_table.read_log)."""
    epochs, steps, knn = {}, {}, {}
    for record in read_log(log):
        if record.get("event") in ("epoch", "knn") and "knn" in record:
            knn[record["epoch"]] = record["knn"]
        if record.get("event") == "epoch":
            epochs[record["epoch"]] = record
        elif "rankme" in record:
            steps[record["step"]] = record
    rankme = {}
    for record in steps.values():
        rankme.setdefault(record["epoch"], []).append(record["rankme"])

    def top1(result):
        return result.get("top1@20", result[min((key for key in result if key.startswith("top1@")),
                                                key=lambda key: int(key[5:]))])

    return {"knn": [(e, top1(result)) for e, result in sorted(knn.items())],
            "loss": [(e, r["loss"]) for e, r in sorted(epochs.items())],
            "rankme": [(e, sum(values) / len(values)) for e, values in sorted(rankme.items())]}


def pretraining_logs(folder):
    """{row: log.jsonl} of the rows whose log is mdra.py's (it logs RankMe)."""
    return {log.parent.name: log for log in sorted(Path(folder).glob("*/log.jsonl"))
            if any('"rankme"' in line for line in log.read_text().splitlines())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="an output folder of reproduce_fashion_mnist.sh, or a copy in results/")
    parser.add_argument("--out", help="the PNG to write; default: <folder>/curves.png")
    args = parser.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        sys.exit("plot_curves.py needs matplotlib, which nothing else here does: pip install matplotlib")
    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot as plt

    logs = pretraining_logs(args.folder)
    if not logs:
        sys.exit(f"plot_curves.py: no pretraining row (a log.jsonl written by mdra.py) in {args.folder}/*/.")
    out = Path(args.out) if args.out else Path(args.folder) / "curves.png"
    draw(plt, logs).savefig(out, dpi=100)
    print(out)


def draw(plt, logs):
    """The figure: a panel per curve, each row in its own colour on every panel (a row without kNN points
    leaves that panel alone), and one legend of all rows."""
    panels = (("knn", "kNN top-1 (%), in-training monitor"), ("loss", "loss (mean of the epoch)"),
              ("rankme", "RankMe of the offline embeddings"))
    figure, axes = plt.subplots(1, len(panels), figsize=(15, 4.2), layout="constrained")
    for i, (row, log) in enumerate(logs.items()):
        for ax, (key, _) in zip(axes, panels):
            points = curves(log)[key]
            if points:
                ax.plot(*zip(*points), color=f"C{i % 10}", marker="o" if key == "knn" else None, markersize=3,
                        label=row)
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(handles=[plt.Line2D([], [], color=f"C{i % 10}", label=row) for i, row in enumerate(logs)])
    return figure


if __name__ == "__main__":
    main()
