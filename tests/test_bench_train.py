"""benchmarks/bench_train.py and benchmarks/device_check.py run end to end (at tiny sizes, on the CPU), so
that they still work on the GPU they exist for."""
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
TINY = ["--archs", "resnet10-w8", "--hidden-dim", "32", "--img-size", "16", "--batch-size", "8", "--queue-size", "32",
        "--warmup", "0", "--steps", "1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, here and in the processes started here: at these sizes more threads only wait
    for each other, and the first step of a network with two of them on a busy machine took seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # its worker pool finds write_jpeg by module name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def device_check():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import device_check
    return device_check


def results(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_every_section_is_measured_and_compared_with_its_baseline(bench_train, tmp_path):
    bench_train.main([*TINY, "--configs", "eager-fp32-nchw", "eager-bf16-nchw", "--e2e-config", "eager-fp32-cl",
                      "--repeats", "2", "--data", "synthetic:32", "--workers", "0", "--gpu-aug", "--e2e-steps", "3",
                      "--loss-cases", "16:64", "--compile-backend", "aot_eager", "--out", str(tmp_path)])
    rows = results(tmp_path)
    # The e2e rows' configuration is measured as their reference, although not among --configs.
    assert [row["section"] for row in rows] == (["step"] * 3 + ["loss"] * 2 + ["parts"] * 6 + ["data"] * 2
                                                + ["e2e"] * 2)
    assert all(row["pairs_per_s"] > 0 for row in rows if "pairs_per_s" in row)
    assert all(row["vs"] for row in rows)
    assert rows[0]["vs"] == "1.00x eager-fp32-nchw" and rows[0]["gflop_per_pair"] > 0
    assert rows[1]["config"] == "eager-bf16-nchw" and rows[1]["vs"].endswith("x eager-fp32-nchw")
    # Each loss case and part of the step eager, then compiled against it: speed-up, compile time, same results.
    cases = ["mdra_loss fwd+bwd B16 N64 G4", "LARS step resnet10-w8", "EMA update resnet10-w8", "queue write B8 N32 G4"]
    assert [(row["case"], row["mode"]) for row in rows[3:11]] == [(case, mode) for case in cases
                                                                  for mode in ("eager", "compiled")]
    for eager, compiled in zip(rows[3:11:2], rows[4:11:2]):
        assert eager["vs"].startswith("1.00x eager") and "compile_s" not in eager
        assert compiled["vs"].startswith(f"{eager['ms'] / compiled['ms']:.2f}x eager") and compiled["compile_s"] > 0
        assert compiled["matches_eager"] and all(diff < 1e-5 for diff in compiled["max_abs_diff"].values())
    assert list(rows[4]["max_abs_diff"]) == ["loss", "grads"] and "of which Sinkhorn" in rows[3]["note"]
    assert "% of a resnet10-w8 eager-" in rows[4]["vs"]  # the loss as a share of a step at its batch
    assert [row["what"] for row in rows[11:13]] == ["loader cpu-aug, 0 workers, 16px b8",
                                                    "loader gpu-aug, held on the device, 16px b8"]
    assert "| step | resnet10-w8 16px b8 eager-fp32-cl |" in (tmp_path / "table.md").read_text()
    assert "generated" not in (tmp_path / "log.txt").read_text()  # mdra.py's synthetic images, no JPEGs written
    for row in rows[-2:]:  # two windows of 3 steps after the 1 micro-batch a worker-less loader prefetches: 7 of 4
        assert row["note"].startswith("median of 2 x 3 steps after 1; waited for views ")
        assert "; crosses an epoch boundary (4 micro-batches" in row["note"]
        assert 0 <= row["data_wait"] < 1
        assert len(row["window_rates"]) == 2 and row["pairs_per_s"] == statistics.median(row["window_rates"])
        assert "(windows " in row["vs"]


def test_a_compiled_result_matches_eager_only_to_float_rounding_of_its_largest_magnitude(bench_train):
    expected = {"loss": [torch.tensor(2.0)], "grads": [torch.tensor([1e-3, -1e-5]), torch.tensor([-4e-3, 0.0])]}

    def off_by(loss, grads):
        return {"loss": [expected["loss"][0] + loss], "grads": [expected["grads"][0] + grads, expected["grads"][1]]}

    assert bench_train.differences(expected, expected) == ({"loss": 0.0, "grads": 0.0}, True)
    diffs, matches = bench_train.differences(off_by(1e-4, 1e-8), expected)  # within 1e-4 of 2 and of 4e-3
    assert diffs == {"loss": pytest.approx(1e-4, rel=0.1), "grads": pytest.approx(1e-8, rel=0.1)} and matches
    assert not bench_train.differences(off_by(0.0, 1e-6), expected)[1]
    assert not bench_train.differences(off_by(1e-3, 0.0), expected)[1]


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


@pytest.mark.parametrize("config", ["eager-fp16-nchw", "eager-fp32-nchw-1pass"])
def test_a_malformed_configuration_is_one_clear_error(bench_train, config):
    with pytest.raises(SystemExit, match="not MODE-DTYPE-LAYOUT"):
        bench_train.main(["--configs", config])


def test_a_failing_measurement_becomes_a_row_and_the_run_goes_on(bench_train, tmp_path):
    bench_train.main([*TINY, "--configs", "eager-fp32-nchw", "compiled-fp32-nchw", "--compile-backend", "no_such_backend",
                      "--repeats", "1", "--sections", "step", "loss", "--loss-cases", "8:32", "8:64",
                      "--out", str(tmp_path)])
    rows = results(tmp_path)
    assert rows[1]["what"] == "resnet10-w8 16px b8 compiled-fp32-nchw" and rows[1]["note"].startswith("failed: ")
    assert [(row["section"], row["mode"], "ms" in row) for row in rows[2:]] == [("loss", "eager", True),
                                                                                ("loss", "compiled", False)] * 2
    assert rows[3]["note"].startswith("failed: ")


def test_a_loaders_workers_stop_when_its_row_is_measured(bench_train):
    import multiprocessing
    args = bench_train.parse_args(["--data", "synthetic:48", "--img-size", "16", "--batch-size", "4", "--queue-size",
                                   "32", "--workers", "2"])
    loader = bench_train.Loader("synthetic:48", args, torch.device("cpu"), gpu_aug=False)
    batches = loader.batches()
    next(batches)
    assert len(multiprocessing.active_children()) == 2  # persistent, as in mdra.py
    batches.close()
    assert bench_train.loader_rate(loader, 4, 2, torch.device("cpu"), max_batches=6) > 0
    assert not multiprocessing.active_children()  # none left augmenting behind the next rows


@pytest.mark.parametrize("argv, message", [(["--batch-size", "8", "--queue-size", "20"], "not a multiple"),
                                           (["--batch-size", "8", "--data-images", "12"], "fewer than two batches"),
                                           (["--img-size", "4"], "4 px is below 8, the smallest crop"),
                                           (["--gpu-aug"], "--gpu-aug makes the views of an in-memory data set"),
                                           (["--path-cases", "resnet18:28"], "is not ARCH:PX:PAIRS[:STEPS]"),
                                           (["--host-ops-case", "resnet18:4:8"], "4 px is below 8"),
                                           (["--path-cases", "resnet18:28:3000"], "is not a multiple of 3000 pairs"),
                                           (["--loss-cases", "512"], "loss case '512' is not B:N[:G]"),
                                           (["--loss-cases", "512:4096:3"], "G dividing 256")])
def test_sizes_that_cannot_work_are_refused_before_anything_runs(bench_train, argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_train.parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_generated_folder_of_fewer_images_than_classes_is_still_an_image_folder(bench_train, tmp_path):
    import data
    bench_train.make_image_folder(tmp_path / "jpegs", 4, 1)
    images = data.ImageFiles(tmp_path / "jpegs")
    assert len(images) == 4 and len(images.classes) == 4  # no empty class folder for ImageFolder to refuse


def test_every_path_is_selected_by_mdra_pys_own_flags(bench_train):
    import mdra
    assert list(bench_train.PATHS)[0] == "reference"
    chosen = {name: mdra.get_parser().parse_args(flags) for name, flags in bench_train.PATHS.items()}
    assert {name: (args.gpu_aug, args.compile) for name, args in chosen.items()} == {
        "reference": (False, "none"), "compiled-loss": (False, "loss"), "compiled-networks": (False, "networks"),
        "compiled-all": (False, "all"), "device-data": (True, "none"), "all": (True, "all")}
    assert {name: bench_train.compile_choice(flags) for name, flags in bench_train.PATHS.items()} == {
        name: args.compile for name, args in chosen.items()}


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


def test_a_device_check_part_past_its_budget_is_stopped_with_the_processes_it_started(device_check, tmp_path):
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
    assert (text.index("## Tests") < text.index("1 passed") < text.index("## Loss, parts and paths")
            < text.index("| loss | mdra_loss fwd+bwd B8 N32 G4 eager |") < text.index("| parts | ")
            < text.index("| paths | "))
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| paths | ")}
    paths = bench_train.PRESETS["cpu"]["paths"]
    assert paths == ["reference", "device-data"]  # the CPU preset leaves the compilations out
    groups = ["fashion-mnist resnet10-w8 8px b2", "synthetic resnet10-w8 8px b2", "host ops resnet10-w8 8px b2"]
    assert list(rows) == [f"{group} {name}" for group in groups for name in paths]
    for row in rows.values():  # each a figure against the reference
        assert "x reference |" in row, row
    assert "1.00x reference" in rows["synthetic resnet10-w8 8px b2 reference"]
    assert "s per epoch of 8 images at that rate" in rows["fashion-mnist resnet10-w8 8px b2 reference"]
    verdict = [line for line in text[text.index("## Verdict"):].splitlines() if line.startswith("- ")]
    # Under the toy's time limit the compilations are the ones skipped, and the verdict says so.
    parts = ["mdra_loss fwd+bwd B8 N32 G4", "LARS step resnet10-w8", "EMA update resnet10-w8",
             "queue write B16 N4096 G4"]
    assert [line.partition(": compiled: skipped: ")[0] for line in verdict[:4]] == [f"- {part}" for part in parts]
    assert [line.split(":")[0] for line in verdict[4:]] == [f"- {group}" for group in groups]
    assert {path.name for path in out.iterdir()} == {"device_check.md", "tests.txt", "bench.txt", "bench"}
    assert {"results.jsonl", "table.md", "log.txt"} <= {path.name for path in (out / "bench").iterdir()}
    assert len(list((out / "bench" / "paths").glob("*/log.jsonl"))) == 4  # each mdra.py run's own record


def test_the_device_check_measures_the_loss_at_the_three_sizes_and_the_parts_with_mdra_pys_paths(bench_train,
                                                                                                  device_check):
    args = bench_train.parse_args([*device_check.BENCH, "--device", "cpu"])  # the h100 preset, parsed without a GPU
    assert args.sections == ["loss", "parts", "paths"] and args.paths == list(bench_train.PATHS)
    assert args.loss_cases == [(64, 65536, 4), (512, 65536, 4), (256, 4096, 4)]


def test_the_device_checks_verdict_names_the_compiled_speed_ups_and_each_groups_fastest_path_and_compile_choice(
        bench_train, device_check):
    def row(group, path, **values):
        flags = bench_train.PATHS[path]
        return {"section": "paths", "group": group, "path": path, "compile": bench_train.compile_choice(flags),
                "gpu_aug": "--gpu-aug" in flags, **values}

    loss, lars = "mdra_loss fwd+bwd B512 N65536 G4", "LARS step resnet50"
    fmnist, r50, ops = "fashion-mnist resnet18 28px b256", "synthetic resnet50 96px b128", "host ops resnet18 28px b256"
    rows = [{"section": "loss", "case": loss, "mode": "eager", "ms": 30.0},
            {"section": "loss", "case": loss, "mode": "compiled", "ms": 10.0, "speedup": 3.0, "compile_s": 41.3,
             "matches_eager": True},
            {"section": "parts", "case": lars, "mode": "compiled", "note": "skipped: 10 s of --time-limit left"},
            row(fmnist, "reference", pairs_per_s=8000.0, data_wait=0.0, s_per_epoch=7.5),
            row(fmnist, "compiled-loss", pairs_per_s=9000.0, data_wait=0.0),
            row(fmnist, "compiled-networks", pairs_per_s=8800.0, data_wait=0.0),
            row(fmnist, "all", pairs_per_s=25000.0, data_wait=0.06, s_per_epoch=2.4),
            row(r50, "reference", note="failed: OutOfMemoryError"), row(r50, "device-data", pairs_per_s=1400.0),
            row(r50, "compiled-all", note="skipped: 10 s of --time-limit left"),
            row(ops, "reference", host_ops=4742), row(ops, "compiled-networks", host_ops=40), {"section": "step"}]
    assert device_check.verdict(rows) == [
        "- mdra_loss fwd+bwd B512 N65536 G4: compiled 3.00x eager, compile 41 s, matches eager",
        "- LARS step resnet50: compiled: skipped: 10 s of --time-limit left",
        "- fashion-mnist resnet18 28px b256: fastest: all, 2.5e+04 pairs/s, 3.12x the reference, waited for data 6%; "
        "fastest --compile: loss, 1.12x the reference",
        "- synthetic resnet50 96px b128: fastest: device-data, 1400 pairs/s, no reference measured",
        "- host ops resnet18 28px b256: fewest operations: compiled-networks, 40 per step, 0.01x the reference; "
        "fewest operations --compile: networks, 0.01x the reference"]
    assert device_check.verdict([row(r50, "compiled-all", note="skipped")]) == [f"- {r50}: nothing measured"]
    assert device_check.verdict([]) == ["- nothing measured"]


def test_a_run_in_its_own_process_as_on_cuda_gives_the_records_of_one_in_this_process(bench_train, tmp_path):
    import mdra
    argv = ["--arch", "resnet10-w8", "--hidden-dim", "32", "--data", "synthetic:32", "--img-size", "8",
            "--batch-size", "8", "--queue-size", "32", "--max-steps", "3", "--log-every", "1", "--workers", "0",
            "--device", "cpu", "--no-compile"]
    losses = {}
    for isolate in (True, False):
        out_dir = tmp_path / f"isolate{isolate}"
        records = bench_train.run_script(mdra, [*argv, "--out-dir", str(out_dir)], out_dir, isolate, 120)
        losses[isolate] = [record["loss"] for record in records if "pairs_per_s" in record]
        assert "console.txt" in {path.name for path in out_dir.iterdir()}
    assert len(losses[True]) == 3 and losses[True] == pytest.approx(losses[False], rel=1e-5)
    with pytest.raises(RuntimeError, match=r"^mdra.py exited with status 2: .*--epochs"):
        bench_train.run_script(mdra, ["--data", "synthetic:8", "--epochs", "0", "--out-dir", str(tmp_path / "bad")],
                               tmp_path / "bad", False, 60)
