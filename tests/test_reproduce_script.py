"""scripts/reproduce_fashion_mnist.sh at a tiny scale on the CPU, its chains in parallel as on a GPU:
each kind of row of the table, the learning-rate trials, and a second run that resumes what a signal (a
time limit) interrupted."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_fashion_mnist.sh"
# The rows the resume test runs: a pretraining and its linear probe (at one rate: no trials), and beside them,
# in the baseline chain, a fine-tuning row from scratch with its learning-rate trials (every process costs
# seconds of imports here: two chains of three; the kNN rows run in the next test).
FINE_TUNED = ["scratch1"]
LRS = ["0.1", "0.01"]
CHOSEN = "mdra-linear scratch1"
ROWS = ["mdra", "mdra-linear", *FINE_TUNED, *(f"lr-trials/{row}-lr{lr}" for row in FINE_TUNED for lr in LRS)]


def tiny_env(epochs=8):  # 32 steps, of which the first run is stopped after 2
    return {**os.environ, "DATA": "synthetic:64", "ARCH": "resnet10-w8", "EPOCHS": str(epochs), "FT_EPOCHS": "1",
            "LINEAR_EPOCHS": "1", "WORKERS": "0", "DEVICE": "cpu", "PARALLEL": "1", "OMP_NUM_THREADS": "1",
            "FLAGS": "--img-size 8", "PRETRAIN_FLAGS": "--hidden-dim 32 --queue-size 32 --batch-size 16 --save-every 2 --warmup-epochs 0 --no-compile",
            "FT_FLAGS": "--batch-size 8", "FT_LRS": " ".join(LRS), "LINEAR_LRS": "0.1", "HOLDOUT": "16",
            "KNN_FLAGS": "--k 10 20", "ROWS": CHOSEN}


def processes_naming(path):
    """The command lines of the running processes that name path."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode() if proc.name.isdigit() else ""
        except OSError:  # it ended meanwhile
            continue
        if str(path) in command:
            found.append(command)
    return found


def test_an_interrupted_table_resumes_and_finished_rows_are_kept(tmp_path):
    out = tmp_path / "table"
    # First run: signalled as timeout signals it, the whole process group, once pretraining has saved.
    results = tmp_path / "results"  # what the first run keeps, although it is stopped
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(["bash", str(SCRIPT), str(out)], env={**tiny_env(), "RESULTS": str(results)},
                                 start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (out / "mdra" / "checkpoint.pth").exists():
        assert first.poll() is None and time.monotonic() < deadline, "pretraining never saved a checkpoint"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGTERM)
    first.wait(timeout=120)
    assert first.returncode != 0
    assert not processes_naming(out)  # the rows saved and exited before the script did
    assert not (out / "mdra" / "time_s").exists() and (out / "mdra" / "elapsed_s").exists()
    assert (results / "results.md").exists() and not (results / "mdra").exists()  # no unfinished row

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
    for row in ("MDRA (G = 4), linear probe (frozen backbone) | 100% |", "supervised from scratch (baseline) | 1% |"):
        line = next(line for line in table.splitlines() if line.startswith(f"| {row}"))
        assert "not run" not in line, line

    third = subprocess.run(["bash", str(SCRIPT), str(out)], env=tiny_env(), capture_output=True, text=True,
                           timeout=120)
    assert third.returncode == 0 and third.stdout.count("finished in an earlier run, kept") == len(ROWS)
    planned = subprocess.run(["bash", str(SCRIPT), str(out)], env={**tiny_env(), "DRY_RUN": "1", "ROWS": "default"},
                             capture_output=True, text=True, timeout=120)
    assert planned.stdout.count("finished in an earlier run, kept") == len(ROWS)
    assert "[dry run] scratch10: " in planned.stdout and not (out / "scratch10").exists()

    other = subprocess.run(["bash", str(SCRIPT), str(out)], env=tiny_env(epochs=9), capture_output=True,
                           text=True, timeout=120)
    assert other.returncode != 0 and "was made by another command" in other.stdout


def test_chosen_rows_run_with_the_pretraining_they_use_and_separate_runs_accumulate_in_results(tmp_path):
    results = tmp_path / "results"

    def script(out, rows):
        return subprocess.run(["bash", str(SCRIPT), str(tmp_path / out)], capture_output=True, text=True, timeout=300,
                              env={**tiny_env(epochs=1), "ROWS": rows, "RESULTS": str(results)})

    refused = script("none", "mdra-nocross-hknn mdra-nothing")
    assert refused.returncode == 2 and "ROWS: no row mdra-nothing;" in refused.stdout
    assert not (tmp_path / "none").exists()
    for out, rows, ran in (("a", "mdra-nocross-hknn", {"mdra-nocross", "mdra-nocross-hknn"}),
                           ("b", "pixels-knn", {"pixels-knn"})):
        done = script(out, rows)
        assert done.returncode == 0, done.stdout + done.stderr
        assert {p.parent.name for p in (tmp_path / out).glob("*/time_s")} == ran
    assert "--arch resnet10-w8 --no-cross --epochs 1" in (tmp_path / "a" / "mdra-nocross" / "command").read_text()
    assert "--holdout 16 --k 10 20 --out" in (tmp_path / "a" / "mdra-nocross-hknn" / "command").read_text()
    # results/ holds both runs' records and their table, and no checkpoint.
    assert {p.parent.name for p in results.glob("*/time_s")} == {"mdra-nocross", "mdra-nocross-hknn", "pixels-knn"}
    assert (results / "mdra-nocross" / "log.jsonl").exists() and not list(results.rglob("*.pth"))
    table = (results / "results.md").read_text()
    nocross = "ablation: no cross alignment, each view with its own relation (--no-cross)"
    assert f"| {nocross} kNN on held-out training images | held-out, kNN | " in table
    assert "| raw-pixel kNN (baseline) | all, kNN | " in table and "Pretraining `mdra-nocross` (1 epochs" in table

    # Another RESULTS folder, whose mdra-nocross is another command's finished record and whose pixels-knn is
    # another command's failed one: the held-out kNN of this mdra-nocross is not kept beside it; the failure is
    # replaced.
    other = tmp_path / "other"
    for row, files in (("mdra-nocross", {"time_s": "9", "log.jsonl": json.dumps({"event": "epoch", "epoch": 7})}),
                       ("pixels-knn", {"failed": "", "elapsed_s": "3"})):
        (other / row).mkdir(parents=True)
        for name, text in {"command": f"python3 {row} --another", "hardware": "a GPU", **files}.items():
            (other / row / name).write_text(text)
    kept = [subprocess.run(["bash", str(SCRIPT), str(tmp_path / out)], capture_output=True, text=True, timeout=60,
                           env={**tiny_env(epochs=1), "ROWS": rows, "RESULTS": str(other)}) for out, rows in
            (("a", "mdra-nocross-hknn"), ("b", "pixels-knn"))]  # finished rows: nothing runs again
    assert all(run.returncode == 0 for run in kept), kept[0].stdout + kept[1].stdout
    refused = kept[0].stdout
    assert f"RESULTS: {other}/mdra-nocross holds another command's row (python3 mdra-nocross --another)" in refused
    assert f"mdra-nocross-hknn not kept: it uses {tmp_path}/a/mdra-nocross, which {other} does not hold" in refused
    assert not (other / "mdra-nocross-hknn").exists() and (other / "mdra-nocross" / "time_s").read_text() == "9"
    assert (other / "pixels-knn" / "time_s").exists() and not (other / "pixels-knn" / "failed").exists()


def test_the_table_reports_both_seeds_and_their_mean(tmp_path):
    for seed, top1 in (("", 87.0), ("-seed1", 88.0)):
        pretraining, knn = tmp_path / f"mdra{seed}", tmp_path / f"mdra{seed}-knn"
        for folder, record in ((pretraining, {"event": "epoch", "epoch": 200}), (knn, None)):
            folder.mkdir()
            (folder / "time_s").write_text("10")
            (folder / "command").write_text(f"python3 run {folder.name}")
            (folder / "hardware").write_text("a GPU")
        (pretraining / "log.jsonl").write_text(json.dumps({"event": "epoch", "epoch": 200}) + "\n")
        (knn / "knn.json").write_text(json.dumps({"results": {"20": {"top1": top1, "top5": top1 + 10}}}))
    made = subprocess.run(["python3", str(SCRIPT.parent / "results_table.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    lines = made.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| MDRA (G = 4) kNN |"))
    assert lines[first + 1].startswith("| MDRA (G = 4) kNN, seed 1 | all, kNN | 88.00 | 98.00 | 200 pretraining |")
    assert lines[first + 2] == "| MDRA (G = 4) kNN, mean of seeds 0 and 1 | all, kNN | 87.50 (spread 1.00) | 97.50 | 200 pretraining | – | | | |"


def test_the_committed_h100_table_is_what_its_logs_give():
    folder = Path(__file__).resolve().parents[1] / "results" / "fashion-mnist-h100-80ep"
    made = subprocess.run(["python3", str(SCRIPT.parent / "results_table.py"), str(folder)], capture_output=True,
                          text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == (folder / "results.md").read_text().strip()


def test_a_failed_learning_rate_trial_drops_out_of_the_choice_and_shows_in_the_table(tmp_path):
    def trial(lr, top1=None):
        folder = tmp_path / "lr-trials" / f"scratch1-lr{lr}"
        folder.mkdir(parents=True)
        if top1 is None:  # what reproduce_fashion_mnist.sh leaves of a trial whose command failed
            (folder / "failed").touch()
            (folder / "elapsed_s").write_text("3")
            return
        (folder / "log.jsonl").write_text(json.dumps({"event": "epoch", "eval": "held-out", "top1": top1}) + "\n")
        (folder / "time_s").write_text("5")

    trial("0.3")
    trial("0.1", 61.5)
    trial("0.01", 62.0)
    table = SCRIPT.parent / "results_table.py"

    def best(*lrs):
        return subprocess.run(["python3", str(table), "--best-lr", str(tmp_path), "scratch1", *lrs],
                              capture_output=True, text=True, timeout=60)

    assert best("0.3", "0.1", "0.01").stdout.strip() == "0.01"
    assert best("0.3", "0.1").stdout.strip() == "0.1"
    refused = best("0.3")
    assert refused.returncode != 0 and "every learning-rate trial of scratch1 (0.3) failed" in refused.stderr
    sys.path.insert(0, str(SCRIPT.parent))
    import results_table
    (tmp_path / "scratch1").mkdir()
    (tmp_path / "scratch1" / "log.jsonl").write_text(json.dumps({"event": "start", "args": {"lr": 0.01}}) + "\n")
    assert results_table.learning_rate(tmp_path, "scratch1") == \
        "0.01 (held-out top-1 0.3: failed, 0.1: 61.50, 0.01: 62.00; trials 13 s)"
    (tmp_path / "scratch1" / "lrs").write_text("0.1 0.01\n")  # chosen from these: an earlier FT_LRS's 0.3 is left out
    assert results_table.learning_rate(tmp_path, "scratch1") == \
        "0.01 (held-out top-1 0.1: 61.50, 0.01: 62.00; trials 10 s)"
    # A failed row shows as failed, also one the script does not run by default, and so does its pretraining.
    for row in ("scratch1", "mdra-nobalance", "mdra-nobalance-knn"):
        (tmp_path / row).mkdir(exist_ok=True)
        for name, text in (("failed", ""), ("command", f"python3 {row}"), ("hardware", "a GPU")):
            (tmp_path / row / name).write_text(text)
    table = subprocess.run(["python3", str(table), str(tmp_path)], capture_output=True, text=True, timeout=60).stdout
    assert "| supervised from scratch (baseline) | 1% | failed | | | | | a GPU | `python3 scratch1` |" in table
    nobalance = "ablation: no balance constraint, R a row softmax as in ReSSL (--sinkhorn-iters 0) kNN"
    assert f"| {nobalance} | all, kNN | failed |" in table
    assert "Pretraining `mdra-nobalance` failed (a GPU): `python3 mdra-nobalance`" in table


def test_a_dry_run_after_a_failed_learning_rate_trial_plans_with_the_rate_the_others_chose(tmp_path):
    out = tmp_path / "out"
    env = {**tiny_env(), "ROWS": "scratch1", "FT_LRS": "0.1 -1", "DRY_RUN": "1"}
    for lr, top1 in (("0.1", 50.0), ("-1", 40.0)):  # finished trials (no command file: any command is theirs)
        trial = out / "lr-trials" / f"scratch1-lr{lr}"
        trial.mkdir(parents=True)
        (trial / "log.jsonl").write_text(json.dumps({"event": "epoch", "eval": "held-out", "top1": top1}) + "\n")
        (trial / "time_s").write_text("5")

    def plan():
        return subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=60, env=env)

    command = next(line for line in plan().stdout.splitlines() if line.startswith("[dry run] scratch1: "))
    (out / "scratch1").mkdir()  # the row, finished with the rate the trials chose
    (out / "scratch1" / "command").write_text(command.removeprefix("[dry run] scratch1: ") + "\n")
    (out / "scratch1" / "time_s").write_text("5")
    failed = out / "lr-trials" / "scratch1-lr-1"  # the other trial failed instead
    (failed / "time_s").unlink()
    (failed / "failed").touch()
    (failed / "elapsed_s").write_text("1")
    planned = plan()
    assert planned.returncode == 0 and "scratch1: finished in an earlier run, kept" in planned.stdout, planned.stdout
    assert "--lr 0.1 --out-dir" in command


def test_a_dry_run_prints_the_commands_of_the_chosen_rows_and_runs_nothing(tmp_path):
    def planned(**env):
        done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "plan")], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "DATA": "synthetic", "DRY_RUN": "1", **env})
        assert done.returncode == 0, done.stdout + done.stderr
        return {line.split(": ")[0].removeprefix("[dry run] "): line.split(": ", 1)[1]
                for line in done.stdout.splitlines() if line.startswith("[dry run] ")}

    rows = planned()
    assert {"mdra", "mdra-knn", "mdra-g1", "mdra-g1-knn", "scratch10", "lr-trials/scratch10-lr0.3"} <= rows.keys()
    assert "--groups 1 --epochs 200" in rows["mdra-g1"] and "--lr <best of 0.3 0.1 0.03 0.01>" in rows["mdra-ft1"]
    ckpt = f"--ckpt {tmp_path}/plan/mdra/checkpoint.pth"
    assert f"{ckpt} --out " in rows["mdra-knn"] and f"{ckpt} --linear --label-fraction 1.0" in rows["mdra-linear"]
    linear = planned(ROWS="mdra-linear", LINEAR_LRS="0.5 0.05")  # the linear probe's own learning-rate trials
    assert {"lr-trials/mdra-linear-lr0.5", "lr-trials/mdra-linear-lr0.05"} <= linear.keys()
    assert not {"mdra-g1", "mdra-g1-knn"} & planned(ABLATION="0").keys()
    ablations = planned(ROWS="ablations")  # each ablation is its one mdra.py flag
    for row, flags in (("mdra-g1", "--groups 1"), ("mdra-nobalance", "--sinkhorn-iters 0"),
                       ("mdra-nopredictor", "--no-predictor"), ("mdra-nocross", "--no-cross")):
        assert f"--arch resnet18 {flags} --epochs 200" in ablations[row] and f"{row}-knn" in ablations
    assert set(planned(ROWS="seeds", FT_LRS="0.1")) == {"mdra-seed1", "mdra-seed1-knn", "mdra-seed1-linear",
                                                        "mdra-g1-seed1", "mdra-g1-seed1-knn"}
    held_out = planned(ROWS="mdra-hknn mdra-seed1-hknn", HOLDOUT="500")  # held-out images, never the test split
    assert set(held_out) == {"mdra", "mdra-hknn", "mdra-seed1", "mdra-seed1-hknn"}
    assert all("--holdout 500" in command for row, command in held_out.items() if row.endswith("-hknn"))
    small = planned(ROWS="mdra random-knn scratch1", ARCH="resnet10-w16")  # ARCH: the pretraining and random init
    assert all("--arch resnet10-w16 " in command for command in small.values()) and "scratch1" in small
    assert not (tmp_path / "plan").exists()
