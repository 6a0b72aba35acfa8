"""scripts/reproduce_fashion_mnist.sh at a tiny scale on the CPU, its chains in parallel as on a GPU:
every row of the table, the learning-rate trials, and a second run that resumes what a signal (a time
limit) interrupted."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_fashion_mnist.sh"
FINE_TUNED = ["mdra-ft1", "mdra-ft10", "mdra-linear", "scratch1", "scratch10"]
LRS = ["0.1", "0.01"]
ROWS = ["mdra", "mdra-knn", "mdra-g1", "mdra-g1-knn", "pixels-knn", "random-knn", *FINE_TUNED,
        *(f"lr-trials/{row}-lr{lr}" for row in FINE_TUNED for lr in LRS)]


def tiny_env(epochs=3):
    return {**os.environ, "DATA": "synthetic", "EPOCHS": str(epochs), "FT_EPOCHS": "1", "LINEAR_EPOCHS": "1",
            "WORKERS": "0", "DEVICE": "cpu", "PARALLEL": "1", "OMP_NUM_THREADS": "1", "FLAGS": "--synthetic-size 64",
            "PRETRAIN_FLAGS": "--queue-size 32 --img-size 16 --batch-size 16 --save-every 2",
            "FT_FLAGS": "--batch-size 8", "FT_LRS": " ".join(LRS), "HOLDOUT": "16", "KNN_FLAGS": "--k 10 20"}


def test_an_interrupted_table_resumes_and_finished_rows_are_kept(tmp_path):
    out = tmp_path / "table"
    # First run: signalled as a time limit signals, the whole process group, once pretraining has saved.
    first = subprocess.Popen(["bash", str(SCRIPT), str(out)], env=tiny_env(), start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (out / "mdra" / "checkpoint.pth").exists():
        assert first.poll() is None and time.monotonic() < deadline, "pretraining never saved a checkpoint"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGTERM)
    first.communicate(timeout=120)
    assert first.returncode != 0
    assert not (out / "mdra" / "time_s").exists() and (out / "mdra" / "elapsed_s").exists()

    second = subprocess.run(["bash", str(SCRIPT), str(out)], env=tiny_env(), capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resumed from" in (out / "mdra" / "output.log").read_text()
    for row in ROWS:
        assert (out / row / "time_s").exists(), row
    for row in FINE_TUNED:  # trained with the learning rate whose trial did best on held-out images
        held_out = {}
        for lr in LRS:
            trial = out / "lr-trials" / f"{row}-lr{lr}"
            assert f"--lr {lr} --holdout 16" in (trial / "command").read_text()
            last = [r for r in map(json.loads, (trial / "log.jsonl").read_text().splitlines()) if r.get("event") == "epoch"][-1]
            held_out[lr] = last["top1"] if last["eval"] == "held-out" else None
        best = max(LRS, key=lambda lr: (held_out[lr], -LRS.index(lr)))
        command = (out / row / "command").read_text()
        assert f"--lr {best} --out-dir" in command and "--holdout" not in command
    table = (out / "results.md").read_text()
    results = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith(("| row", "| ---"))]
    assert len(results) == 9 and "not run" not in table  # the two pretrainings are notes under the table

    third = subprocess.run(["bash", str(SCRIPT), str(out)], env=tiny_env(), capture_output=True, text=True,
                           timeout=120)
    assert third.returncode == 0 and third.stdout.count("finished in an earlier run, kept") == len(ROWS)
    without_ablation = subprocess.run(["bash", str(SCRIPT), str(out)], env={**tiny_env(), "ABLATION": "0"},
                                      capture_output=True, text=True, timeout=120)
    assert without_ablation.returncode == 0 and "] mdra-g1" not in without_ablation.stdout  # no row line
    assert without_ablation.stdout.count("finished in an earlier run, kept") == len(ROWS) - 2

    other = subprocess.run(["bash", str(SCRIPT), str(out)], env=tiny_env(epochs=4), capture_output=True,
                           text=True, timeout=120)
    assert other.returncode != 0 and "was made by another command" in other.stdout


def test_the_committed_h100_table_is_what_its_logs_give():
    folder = Path(__file__).resolve().parents[1] / "results" / "fashion-mnist-h100-80ep"
    made = subprocess.run(["python3", str(SCRIPT.parent / "results_table.py"), str(folder)], capture_output=True,
                          text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == (folder / "results.md").read_text().strip()
