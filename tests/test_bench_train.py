"""benchmarks/bench_train.py runs end to end (at tiny sizes, on the CPU), so that it still works when the
GPU run it exists for comes."""
import importlib.util
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # its worker pool finds write_jpeg by module name
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
def test_every_section_is_measured_and_compared_with_its_baseline(bench_train, tmp_path):
    bench_train.main(["--archs", "resnet18", "--img-size", "16", "--batch-size", "8", "--queue-size", "32",
                      "--configs", "eager-fp32-nchw", "eager-fp32-nchw-1pass", "--e2e-config", "eager-fp32-cl", "--warmup", "0", "--steps", "1",
                      "--repeats", "2", "--data-images", "32", "--workers", "0", "--gpu-aug",
                      "--loss-batch", "16", "--loss-queue", "64", "--e2e-steps", "3", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    # The e2e rows' configuration is measured as their reference, although not among --configs.
    assert [row["section"] for row in rows] == ["step"] * 3 + ["loss"] * 2 + ["data"] * 3 + ["e2e"] * 2
    assert all(row["pairs_per_s"] > 0 for row in rows if "pairs_per_s" in row)
    assert all(row["vs"] for row in rows)
    assert rows[0]["vs"] == "1.00x eager-fp32-nchw" and rows[0]["gflop_per_pair"] > 0
    assert rows[1]["config"] == "eager-fp32-nchw-1pass" and rows[1]["vs"].endswith("x eager-fp32-nchw")
    assert [row["host_ops"] > 100 for row in rows if "host_ops" in row] == [True]  # the device work of --gpu-aug
    assert "| step | resnet18 16px b8 eager-fp32-cl |" in (tmp_path / "table.md").read_text()
    for row in rows[-2:]:  # two windows of 3 steps after the 1 micro-batch a worker-less loader prefetches: 7 of 4
        assert row["note"].startswith("median of 2 x 3 steps after 1; waited for views ")
        assert "; crosses an epoch boundary (4 micro-batches" in row["note"]
        assert 0 <= row["data_wait"] < 1
        assert len(row["window_rates"]) == 2 and row["pairs_per_s"] == statistics.median(row["window_rates"])
        assert "(windows " in row["vs"]


def test_steady_rates_leave_out_the_skipped_calls_and_time_each_window(bench_train):
    calls = []
    rates = bench_train.steady_rates(lambda: calls.append(1), 5, 8, 3, torch.device("cpu"), windows=4)
    assert len(calls) == 3 + 4 * 5 and len(rates) == 4 and all(rate > 0 for rate in rates)


def test_fed_rates_share_of_waiting_for_views_counts_the_timed_steps_only(bench_train, monkeypatch):
    clock = [0.0]  # a clock that moves only where the batches and the step say
    monkeypatch.setattr(bench_train.time, "perf_counter", lambda: clock[0])

    def batches():  # the micro-batches of the 2 skipped steps take 100 each, the others 5
        for i in itertools.count():
            clock[0] += 100 if i < 4 else 5
            yield i

    def step(next_views):  # two micro-batches per step, 10 of work each
        for _ in range(2):
            next_views()
            clock[0] += 10

    rates, data_wait = bench_train.fed_rates(step, batches(), 3, 16, 2, torch.device("cpu"), windows=2)
    assert rates == [3 * 16 / 90] * 2 and data_wait == 30 / 90


def test_host_ops_counts_the_operations_a_call_dispatches(bench_train):
    x = bench_train.torch.ones(4)

    def adds(n):
        for _ in range(n):
            x.add(x)

    assert bench_train.host_ops(lambda: adds(1)) == 1  # aten::add
    assert bench_train.host_ops(lambda: adds(30)) == 30
    assert bench_train.host_ops(lambda: x.add(1)) > 1  # a Python number is wrapped in a tensor first


def test_a_malformed_configuration_is_one_clear_error(bench_train):
    with pytest.raises(SystemExit, match="not MODE-DTYPE-LAYOUT"):
        bench_train.main(["--configs", "eager-fp16-nchw"])


def test_a_failing_measurement_becomes_a_row_and_the_run_goes_on(bench_train, tmp_path):
    bench_train.main(["--archs", "resnet18", "--img-size", "16", "--batch-size", "8", "--queue-size", "32",
                      "--configs", "eager-fp32-nchw", "compiled-fp32-nchw", "--compile-backend", "no_such_backend",
                      "--warmup", "0", "--steps", "1", "--repeats", "1", "--sections", "step", "loss",
                      "--loss-batch", "8", "--loss-queue", "32", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rows[1]["what"] == "resnet18 16px b8 compiled-fp32-nchw" and rows[1]["note"].startswith("failed: ")
    assert rows[2]["section"] == "loss" and rows[2]["ms"] > 0


def test_the_loader_of_a_named_data_set_is_measured(bench_train, tmp_path):
    bench_train.main(["--sections", "data", "--data", "synthetic", "--img-size", "16", "--batch-size", "64",
                      "--workers", "0", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [row["what"] for row in rows] == ["loader cpu-aug, 0 workers, 16px b64"] and rows[0]["pairs_per_s"] > 0
    assert "generated" not in (tmp_path / "log.txt").read_text()  # mdra.py's synthetic images, no JPEGs written


def test_loaders_with_weak_offline_views_are_measured_against_the_same_loaders(bench_train, tmp_path):
    args = bench_train.parse_args(["--data", "synthetic", "--img-size", "16", "--batch-size", "8", "--queue-size", "32",
                                   "--workers", "0"])
    for gpu_aug in (False, True):
        same, weak = (next(bench_train.Loader("synthetic", args, torch.device("cpu"), gpu_aug, view).batches())
                      for view in ("same", "weak"))
        assert len(same) == 2 and len(weak) == 4  # v1, v2, then the offline encoder's w1, w2
        assert all(torch.equal(a, b) for a, b in zip(same, weak))  # drawn after the two views, which stay
        assert not torch.equal(weak[2], weak[0])
    bench_train.main(["--sections", "data", "--data", "synthetic", "--img-size", "16", "--batch-size", "64",
                      "--workers", "0", "--offline-views", "same", "weak", "--gpu-aug", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [row["loader"] for row in rows] == ["cpu-aug", "cpu-aug weak-offline", "gpu-aug", "gpu-aug",
                                               "gpu-aug weak-offline", "gpu-aug weak-offline"]
    table = (tmp_path / "table.md").read_text()
    for row in rows[1], rows[4], rows[5]:  # each against the same loader's row of its kind
        twin = next(r for r in rows if (r["loader"], r.get("device_work")) == (row["loader"].split()[0],
                                                                                 row.get("device_work")))
        assert f"| {row['pairs_per_s'] / twin['pairs_per_s']:.2f}x the loader {twin['loader']} |" in table


def test_a_loaders_workers_stop_when_its_row_is_measured(bench_train, tmp_path):
    import multiprocessing
    bench_train.make_image_folder(tmp_path / "jpegs", 48, 1)
    args = bench_train.parse_args(["--img-size", "16", "--batch-size", "4", "--queue-size", "32", "--workers", "2",
                                   "--data-images", "48"])
    loader = bench_train.Loader(tmp_path / "jpegs", args, torch.device("cpu"), gpu_aug=False)
    batches = loader.batches()
    next(batches)
    assert len(multiprocessing.active_children()) == 2  # persistent, as in mdra.py
    batches.close()
    assert bench_train.loader_rate(loader, 4, 2, torch.device("cpu"), max_batches=6) > 0
    assert not multiprocessing.active_children()  # none left augmenting behind the next rows


@pytest.mark.parametrize("argv, message", [(["--batch-size", "8", "--queue-size", "20"], "not a multiple"),
                                           (["--batch-size", "8", "--data-images", "12"], "fewer than two batches"),
                                           (["--img-size", "4"], "4 px is below 8, the smallest crop"),
                                           (["--path-cases", "resnet18:28"], "is not ARCH:PX:PAIRS[:STEPS]"),
                                           (["--host-ops-case", "resnet18:4:8"], "4 px is below 8"),
                                           (["--path-cases", "resnet18:28:3000"], "is not a multiple of 3000 pairs")])
def test_sizes_that_cannot_work_are_refused_before_anything_runs(bench_train, argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_train.parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_generated_folder_of_fewer_images_than_classes_is_still_an_image_folder(bench_train, tmp_path):
    import mdra
    bench_train.make_image_folder(tmp_path / "jpegs", 4, 1)
    images = mdra.ImageFiles(tmp_path / "jpegs")
    assert len(images) == 4 and len(images.classes) == 4  # no empty class folder for ImageFolder to refuse


def test_host_ops_counts_the_operations_of_every_thread(bench_train):
    import threading
    x = bench_train.torch.ones(4)

    def adds_in_a_thread():  # as a --gpu-aug prefetch thread makes views beside the loop
        thread = threading.Thread(target=lambda: [x.add(x) for _ in range(7)])
        thread.start()
        thread.join()
        x.add(x)

    if not bench_train.HOST_OPS_ALL_THREADS:
        pytest.skip("this torch's profiler counts the calling thread only")
    assert bench_train.host_ops(adds_in_a_thread) == 8


def test_a_path_that_mdra_lacks_a_flag_of_is_skipped_and_a_lacking_no_flag_left_out(bench_train, monkeypatch):
    monkeypatch.setitem(bench_train.PATHS, "later", ["--one-pass", "--no-path-of-later"])
    monkeypatch.setitem(bench_train.PATHS, "not yet", ["--no-one-pass", "--path-of-later"])
    monkeypatch.setitem(bench_train.PATHS, "abbreviated", ["--compile-back"])  # not --compile-backend
    assert bench_train.path_flags("later") == (["--one-pass"], None)  # what mdra.py does without the flag
    assert bench_train.path_flags("not yet") == (None, "--path-of-later")
    assert bench_train.path_flags("abbreviated") == (None, "--compile-back")
    assert bench_train.path_flags("reference")[1] is None and bench_train.path_flags("one-pass")[1] is None


def test_a_runs_steady_rate_leaves_out_its_first_window_and_weighs_the_wait_by_time(bench_train):
    records = [{"event": "start", "step": 0},
               {"step": 2, "pairs_per_s": 1.0, "data_wait": 0.9},  # the start: left out
               {"step": 4, "pairs_per_s": 8.0, "data_wait": 0.5},  # 2 steps of 4 pairs in 1 s
               {"event": "epoch", "epoch": 1, "step": 4, "time_s": 9.0},
               {"step": 10, "pairs_per_s": 24.0, "data_wait": 0.0}]  # 6 steps in 1 s
    assert bench_train.steady_state(records, 4) == (32 / 2, 0.5 / 2, 8)
    with pytest.raises(RuntimeError, match="too few to leave the first out"):
        bench_train.steady_state(records[:2], 4)


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def test_a_device_check_part_past_its_budget_is_stopped_with_the_processes_it_started(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import device_check
    sleeper = "import subprocess; p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True); p.wait()"
    log = tmp_path / "part.txt"
    assert device_check.run_part([sys.executable, "-c", sleeper], 1, log) == "stopped at its budget of 1 s"
    grandchild, deadline = int(log.read_text()), time.monotonic() + 10
    while alive(grandchild) and time.monotonic() < deadline:  # SIGKILL is delivered, not waited for
        time.sleep(0.05)
    assert not alive(grandchild)
    assert device_check.run_part([sys.executable, "-c", "raise SystemExit(3)"], 5, log).startswith("exit status 3 ")


def test_the_device_check_writes_each_part_and_a_row_per_path_to_one_file(bench_train, tmp_path):
    import gzip
    import subprocess
    import tarfile
    data = tmp_path / "fashion-mnist"  # 8 images, as mdra.py reads the IDX files from --data-dir
    data.mkdir()
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (8, 28, 28))
    (data / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(range(256)) * 24 + bytes(128)))
    labels = bytes([0, 0, 8, 1]) + (8).to_bytes(4, "big") + bytes(range(8))
    (data / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    (tmp_path / "test_ok.py").write_text("def test_ok():\n    pass\n")
    out = tmp_path / "out"
    subprocess.run([sys.executable, "benchmarks/device_check.py", "--toy", "--out", str(out), "--data-dir", str(data),
                    "--tests", str(tmp_path / "test_ok.py")], cwd=REPO, check=True, timeout=240)
    text = (out / "device_check.md").read_text()
    assert " | GPU: " in text.splitlines()[2]  # the environment, then each part in its place
    assert text.index("## Tests") < text.index("1 passed") < text.index("## Paths") < text.index("| paths | ")
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| paths | ")}
    paths = bench_train.PRESETS["cpu"]["paths"]
    groups = {"fashion-mnist resnet18 8px b2": ["reference", "all-new"], "synthetic resnet18 8px b2": paths,
              "host ops resnet18 8px b2": paths}
    assert list(rows) == [f"{group} {name}" for group, names in groups.items() for name in names]
    for row in rows.values():  # a figure against the reference, or why there is none
        assert ("x reference |" in row) != (" | skipped: " in row), row
    assert "1.00x reference" in rows["synthetic resnet18 8px b2 reference"]
    assert "s per epoch of 8 images at that rate" in rows["fashion-mnist resnet18 8px b2 reference"]
    assert text.index("| paths | ") < text.index("## Verdict") < text.index("- target: Fashion-MNIST end to end")
    # What the GPU machine gives back: at most 8 files, none more than 2 folders down.
    files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    assert files == ["bench.tar.gz", "device_check.md", "finetune.txt", "paths.txt", "tests.txt"]
    assert text.index("## Verdict") < text.index("## Fine-tuning: the CPU loader against --gpu-aug")
    finetune_rows = [line for line in text.splitlines() if line.startswith(("| linear probe |", "| fine-tuning |"))]
    assert len(finetune_rows) == 4 and all("x loader |" in row for row in finetune_rows), finetune_rows
    with tarfile.open(out / "bench.tar.gz") as archive:
        names = archive.getnames()
    assert {"bench/results.jsonl", "bench/table.md", "bench/log.txt"} <= set(names)
    assert sum(name.endswith("/log.jsonl") for name in names) == len(rows) - len(paths) + 4  # each run's


def test_the_device_checks_verdict_names_each_groups_fastest_path_and_each_target_met_or_missed():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import device_check

    def row(group, path, **values):
        return {"section": "paths", "group": group, "path": path, **values}

    fmnist, r50, ops = "fashion-mnist resnet18 28px b256", "synthetic resnet50 224px b64", "host ops resnet18 28px b256"
    rows = [row(fmnist, "reference", pairs_per_s=8000.0, data_wait=0.0, s_per_epoch=7.5),
            row(fmnist, "all-new", pairs_per_s=25000.0, data_wait=0.06, s_per_epoch=2.4),
            row(r50, "reference", pairs_per_s=1000.0), row(r50, "one-pass", pairs_per_s=1400.0),
            row(r50, "captured", pairs_per_s=1200.0), row(r50, "compiled", note="skipped: 10 s of --time-limit left"),
            row(ops, "reference", host_ops=4742), row(ops, "all-new", host_ops=40)]
    assert device_check.verdict(rows) == [
        "- fashion-mnist resnet18 28px b256: fastest: all-new, 2.5e+04 pairs/s, 3.12x the reference",
        "- synthetic resnet50 224px b64: fastest: one-pass, 1400 pairs/s, 1.40x the reference",
        "- host ops resnet18 28px b256: fewest operations: all-new, 40 per step, 0.01x the reference",
        "- target: Fashion-MNIST end to end, all-new against the reference, at least 3x: 3.12x (met); "
        "2.40 s per epoch, 200 epochs in 8.0 min",
        "- target: resnet50 at 224 px x 64 pairs, the best new path against the reference, at least 1.5x: "
        "one-pass 1.40x (missed)",
        "- target: wait for data under 5% of the step on the all-new path: at most 6.0% (missed)",
        "- target: host operations per optimizer step of all-new, at most 0.5x the reference: 0.01x (met)"]
    assert all(line.endswith("not measured") for line in device_check.verdict([])) and len(device_check.verdict([])) == 4


def test_a_run_in_its_own_process_as_on_cuda_gives_the_records_of_one_in_this_process(bench_train, tmp_path):
    import finetune
    import mdra
    argv = ["--random-init", "--arch", "resnet18", "--data", "synthetic", "--synthetic-size", "32", "--img-size", "16",
            "--label-fraction", "1.0", "--epochs", "1", "--max-steps", "3", "--log-every", "1", "--batch-size", "8",
            "--workers", "0", "--device", "cpu", "--no-compile"]
    losses = {}
    for isolate in (True, False):
        out_dir = tmp_path / f"isolate{isolate}"
        records = bench_train.run_script(finetune, [*argv, "--out-dir", str(out_dir)], out_dir, isolate, 120)
        losses[isolate] = [record["loss"] for record in records if "images_per_s" in record]
        assert "console.txt" in {path.name for path in out_dir.iterdir()}
    assert len(losses[True]) == 3 and losses[True] == pytest.approx(losses[False], rel=1e-5)
    with pytest.raises(RuntimeError, match=r"^mdra.py exited with status 2: .*--epochs"):
        bench_train.run_script(mdra, ["--epochs", "0", "--out-dir", str(tmp_path / "bad")], tmp_path / "bad", False, 60)
