"""mdra.py end to end: checkpoints, exact resume, signals, real data, torchrun, compile, bad input."""
import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data
import mdra
import runtime

REPO = Path(__file__).resolve().parents[1]
# 64 synthetic images of 8 px, 16 per step: 4 optimizer steps per epoch of a narrow ResNet-10 with a narrow
# projector and predictor, a few milliseconds each, and checkpoints of about a megabyte.
TINY = ["--no-compile", "--warmup-epochs", "1", "--data", "synthetic:64", "--img-size", "8", "--arch", "resnet10-w8", "--hidden-dim", "32",
        "--batch-size", "16", "--queue-size", "64", "--workers", "0", "--log-every", "1", "--device", "cpu"]


def run(out_dir, *extra):
    return mdra.main([*TINY, "--out-dir", str(out_dir), *extra])


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def log_records(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def run_cli(args, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=240, **kwargs)


def assert_same_state(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}/{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def test_checkpoint_has_the_shared_format_and_loads_with_weights_only(tmp_path):
    path = run(tmp_path, "--epochs", "1")
    ckpt = load(path)
    assert ckpt["format"] == "mdra" and ckpt["version"] == 1
    assert ckpt["arch"] == "resnet10-w8" and ckpt["small_stem"] is True and ckpt["feature_dim"] == 64
    assert ckpt["epoch"] == 1 and ckpt["step"] == 4
    assert ckpt["queue"].shape == (64, 256) and ckpt["queue_ptr"] == 0  # 4 batches of 16 filled 64 slots
    for key in ("online", "offline", "optimizer", "scaler", "rng", "args"):
        assert key in ckpt
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["backbone"])
    backbone, _ = mdra.build_backbone("resnet10-w8", small_stem=True)
    backbone.load_state_dict(ckpt["backbone"])  # strict by default
    for k, v in ckpt["backbone"].items():
        assert torch.equal(v, ckpt["online"][f"encoder.backbone.{k}"])
    # The queue holds offline embeddings with every subspace slice normalised.
    torch.testing.assert_close(ckpt["queue"].view(64, 4, 64).norm(dim=-1), torch.ones(64, 4))


def test_log_has_a_json_record_per_step_and_epoch(tmp_path):
    run(tmp_path, "--epochs", "1")
    records = log_records(tmp_path)
    assert records[0]["event"] == "start" and records[0]["world_size"] == 1
    steps = [r for r in records if "pairs_per_s" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert r["loss"] > 0 and 1 <= r["rankme"] <= 16 and 0 <= r["data_wait"] <= 1 and r["peak_mem_gb"] > 0
    assert steps[0]["lr"] == 0  # linear warm-up starts from zero
    assert records[-1]["event"] == "epoch" and records[-1]["epoch"] == 1


def closing_lines(out):
    """What a run printed after its "done" line."""
    lines = out.splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("done: ")) + 1:]


def test_the_closing_lines_read_the_steps_behind_the_final_weights_from_the_log(tmp_path):
    log = [{"event": "start", "step": 0}, *({"step": s, "loss": 9.0, "rankme": 1.0} for s in (1, 2, 3)),  # run A
           {"event": "start", "step": 0}, *({"step": s, "loss": 8.0 - s, "rankme": 10.0} for s in (1, 2, 3)),  # B
           {"event": "epoch", "epoch": 1, "step": 3},
           {"event": "start", "step": 2}, *({"step": s, "loss": 4.0 - s, "rankme": 12.0} for s in (3, 4))]  # B resumed
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log) + '{"step": 5, "lo')  # killed
    kept = [(r.get("event"), r["step"], r.get("loss")) for r in runtime.logged_records(tmp_path / "log.jsonl")]
    assert kept == [(None, 1, 7), (None, 2, 6), (None, 3, 1), (None, 4, 0)]  # what B logged after step 2 went


def test_the_closing_lines_say_what_the_loss_and_rankme_show_and_how_to_see_whether_the_features_are_useful():
    def records(losses, ranks):
        return [{"step": 5 * (i + 1), "loss": loss, "rankme": rank, "pairs_per_s": 20.0}
                for i, (loss, rank) in enumerate(zip(losses, ranks))]

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    learning = mdra.closing_lines(records([12, 11, 10, 9, 8, 7], [50, 52, 54, 56, 58, 60]), 64, Path("run/c.pth"), cpu)
    assert learning[0] == "steps 5-15 against 20-30 (means of 3 log points): loss 11.0000 -> 8.0000, RankMe 52.0 -> 58.0 of 64"
    assert learning[1] == "The loss fell: the objective is being optimised; RankMe is far from 1: the embedding has not collapsed."
    # On a CPU, a kNN check on a bank that it extracts in minutes; on a GPU, the whole training set.
    assert learning[2].endswith("python3 eval_knn.py --ckpt run/c.pth --knn-subset 10000, then the same with --random-init.")
    on_gpu = mdra.closing_lines(records([12, 11], [50, 52]), 64, Path("c.pth"), cuda)
    assert on_gpu[2].endswith("python3 eval_knn.py --ckpt c.pth, then the same with --random-init.")
    stuck = mdra.closing_lines(records([8, 9], [40, 6]), 64, Path("c.pth"), cpu)
    assert stuck[1] == ("The loss did not fall: the objective is not (yet) being optimised; RankMe is below 10% of its "
                        "maximum: the embedding is collapsing.") and len(stuck) == 3
    assert mdra.closing_lines(records([8], [40]), 64, Path("c.pth"), cpu) == [
        "1 log point(s), too few to compare the start with the end: log more often (--log-every)."]
    # With the kNN monitor, the untrained network's (step 0) against the last one measured, in place of the advice.
    monitored = [{"event": "knn", "epoch": 0, "step": 0, "knn": {"top1@20": 73.5, "top5@20": 97.0}},
                 *records([12, 11, 10, 9], [50, 52, 54, 56]),
                 {"event": "epoch", "epoch": 1, "step": 20, "loss": 9.5, "knn": {"top1@20": 76.25, "top5@20": 98.0}}]
    assert mdra.closing_lines(monitored, 64, Path("c.pth"), cpu, bank=10000)[2:] == [
        "kNN top-1 (k = 20, a bank of 10000 training images): 73.50% untrained, 76.25% after step 20: the features "
        "are 2.75 points more useful than the same network's untrained."]
    monitored[-1]["knn"] = {"top1@5": 70.0, "top5@5": 97.0}  # a bank smaller than 20: k is the bank's size
    monitored[0]["knn"] = {"top1@5": 71.0, "top5@5": 97.0}
    assert mdra.closing_lines(monitored, 64, Path("c.pth"), cpu)[2:] == [
        "kNN top-1 (k = 5, all training images as the bank): 71.00% untrained, 70.00% after step 20: the features "
        "are not (yet) more useful than the same network's untrained."]


def test_the_knn_monitor_measures_the_untrained_network_first_and_the_end_of_a_run_stopped_inside_an_epoch(tmp_path):
    run(tmp_path, "--epochs", "2", "--knn-every", "1", "--max-steps", "6")
    knn = [(r.get("event"), r["epoch"], r["step"]) for r in log_records(tmp_path) if "knn" in r]
    assert knn == [("knn", 0, 0), ("epoch", 1, 4), ("knn", 1.5, 6)]
    torch.manual_seed(0)  # the network of step 0 is the untrained one, as eval_knn.py --random-init builds it
    untrained = runtime.logged_records(tmp_path / "log.jsonl")[0]["knn"]
    import eval_knn
    baseline = eval_knn.main(["--random-init", "--arch", "resnet10-w8", "--data", "synthetic:64", "--img-size", "8",
                              "--k", "20", "--workers", "0", "--out", str(tmp_path / "random.json")])
    assert untrained == {"top1@20": pytest.approx(baseline[20][0]), "top5@20": pytest.approx(baseline[20][1])}
    run(tmp_path, "--epochs", "2", "--knn-every", "1")  # resumed: no second untrained monitor, the epoch's
    knn = [(r.get("event"), r["epoch"], r["step"]) for r in log_records(tmp_path) if "knn" in r]
    assert knn[3:] == [("epoch", 2, 8)]


def test_interrupted_and_resumed_run_ends_with_the_same_weights_and_the_same_closing_lines(tmp_path, capsys):
    straight = run(tmp_path / "a", "--epochs", "2")
    straight_out = capsys.readouterr().out
    # Stop inside the first epoch (with other worker processes), then resume across the epoch boundary.
    run(tmp_path / "b", "--epochs", "2", "--max-steps", "3", "--workers", "2")
    assert load(tmp_path / "b" / "checkpoint.pth")["step"] == 3
    capsys.readouterr()
    resumed = run(tmp_path / "b", "--epochs", "2")
    a, b = load(straight), load(resumed)
    assert a["step"] == b["step"] == 8
    for key in ("online", "offline", "queue", "queue_ptr", "optimizer", "backbone"):
        assert_same_state(a[key], b[key], key)
    losses_a = [r["loss"] for r in log_records(tmp_path / "a") if "pairs_per_s" in r]
    losses_b = [r["loss"] for r in log_records(tmp_path / "b") if "pairs_per_s" in r]
    assert losses_a == losses_b
    # Each epoch's record is the mean loss of all its steps, those before the resume too (the checkpoint keeps them).
    epochs_a, epochs_b = ({r["epoch"]: r["loss"] for r in log_records(tmp_path / name) if r.get("event") == "epoch"}
                          for name in "ab")
    assert list(epochs_b) == list(epochs_a) == [1, 2] and epochs_a[1] == pytest.approx(sum(losses_a[:4]) / 4)
    assert list(epochs_b.values()) == pytest.approx(list(epochs_a.values()), rel=1e-6)
    # The resumed run's closing lines count the steps the interrupted one logged; its start record says where it began.
    assert [r["step"] for r in log_records(tmp_path / "b") if r.get("event") == "start"] == [0, 3]
    steps = [r for r in log_records(tmp_path / "a") if "pairs_per_s" in r]
    first, last = steps[:3], steps[-3:]
    assert closing_lines(straight_out)[0] == (
        f"steps 1-3 against 6-8 (means of 3 log points): loss {sum(r['loss'] for r in first) / 3:.4f} -> "
        f"{sum(r['loss'] for r in last) / 3:.4f}, RankMe {sum(r['rankme'] for r in first) / 3:.1f} -> "
        f"{sum(r['rankme'] for r in last) / 3:.1f} of 16")
    assert closing_lines(capsys.readouterr().out) == [line.replace(str(tmp_path / "a"), str(tmp_path / "b"))
                                                      for line in closing_lines(straight_out)]


def test_the_loop_moves_the_offline_encoder_once_per_optimizer_step_and_runs_it_in_train_mode(tmp_path, monkeypatch):
    modes, real_micro_step = [], mdra.micro_step

    def recording(online, offline, *args, **kwargs):
        modes.append(offline.training)
        return real_micro_step(online, offline, *args, **kwargs)

    monkeypatch.setattr(mdra, "micro_step", recording)
    torch.manual_seed(0)  # train() seeds with --seed 0 and then builds the model
    online, _, _ = mdra.build_model("resnet10-w8", small_stem=True, hidden_dim=32)
    offline = {k: v.double() for k, v in online.encoder.state_dict().items()}  # the copy it starts as
    parameters = {name for name, _ in online.encoder.named_parameters()}
    m = 0.99
    for steps in (1, 2):  # two micro-batches per optimizer step: the EMA must move once, not per micro-batch
        ckpt = load(run(tmp_path, "--max-steps", str(steps), "--accum-steps", "2", "--warmup-epochs", "0"))
        for key, value in ckpt["offline"].items():
            theta = ckpt["online"]["encoder." + key]
            if key in parameters:  # xi <- m xi + (1 - m) theta, in float64
                offline[key] = m * offline[key] + (1 - m) * theta.double()
                torch.testing.assert_close(value.double(), offline[key], atol=1e-6, rtol=0, msg=key)
            else:  # BatchNorm buffers are copied
                assert torch.equal(value, theta), key
                offline[key] = value.double()
    assert modes == [True] * 4  # batch statistics, as BYOL


def test_kept_copies_and_max_steps_do_not_change_the_schedule(tmp_path):
    run(tmp_path, "--epochs", "3", "--keep-every", "1", "--max-steps", "6")
    assert sorted(p.name for p in tmp_path.glob("checkpoint_epoch*.pth")) == ["checkpoint_epoch0001.pth"]
    lrs = [r["lr"] for r in log_records(tmp_path) if "pairs_per_s" in r]
    expected = mdra.warmup_cosine(0.3 * 16 / 256, total_steps=12, warmup_steps=4)  # TINY's 1 warm-up epoch
    assert lrs == pytest.approx(list(expected[:6]))


def test_sigterm_to_the_process_group_saves_a_checkpoint_and_exits(tmp_path):
    # A scheduler signals every process of the job, data-loading workers included.
    proc = subprocess.Popen([sys.executable, "mdra.py", *TINY, "--workers", "2", "--epochs", "100",
                             "--out-dir", str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and '"step": 2' in log.read_text()):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by a signal" in out
    ckpt = load(tmp_path / "checkpoint.pth")
    assert ckpt["step"] >= 2 and ckpt["step"] == log_records(tmp_path)[-1]["step"]


def test_a_console_that_goes_away_neither_stops_the_run_nor_keeps_a_signal_from_saving(tmp_path):
    # `mdra.py | tee log` and Ctrl-C: tee ends at once, and the run's next line meets a closed pipe.
    # SIGINT as a foreground run has it, even where this test runs in the background (ignoring SIGINT).
    proc = subprocess.Popen([sys.executable, "mdra.py", *TINY, "--epochs", "100", "--out-dir", str(tmp_path)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.stdout.readline()
    proc.stdout.close()
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and '"step": 3' in log.read_text()):  # two lines after the pipe closed
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT, proc.stderr.read()
    assert load(tmp_path / "checkpoint.pth")["step"] == log_records(tmp_path)[-1]["step"] >= 3


def test_sigterm_to_the_process_group_during_the_knn_monitor_keeps_the_epoch_and_its_result(tmp_path):
    # The first image the monitor's worker reads signals the whole group, as a scheduler's time limit would.
    # (One worker: a sibling still starting up would die of it, before it can ignore the signal.)
    # The monitor of the untrained network runs first, before any step: the signal comes in epoch 1's.
    signal_once = ("import os, signal, sys, data, mdra\n"
                   "read, ema_update = data.CentreCrops.__getitem__, mdra.ema_update\n"
                   "def trained(*args):\n"
                   "    open(sys.argv[-1] + '/trained', 'w').close()\n"
                   "    ema_update(*args)\n"
                   "def read_and_signal(self, i):\n"
                   "    if os.path.exists(sys.argv[-1] + '/trained') and not os.path.exists(sys.argv[-1] + '/signalled'):\n"
                   "        open(sys.argv[-1] + '/signalled', 'w').close()\n"
                   "        os.killpg(0, signal.SIGTERM)\n"
                   "    return read(self, i)\n"
                   "data.CentreCrops.__getitem__, mdra.ema_update = read_and_signal, trained\n"
                   "mdra.main(sys.argv[1:])\n")
    result = subprocess.run([sys.executable, "-c", signal_once, *TINY, "--workers", "1", "--epochs", "3",
                             "--knn-every", "1", "--out-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=120, start_new_session=True)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    epoch = [r for r in log_records(tmp_path) if r.get("event") == "epoch"]
    assert [r["epoch"] for r in epoch] == [1] and "knn" in epoch[0]
    assert load(tmp_path / "checkpoint.pth")["step"] == 4  # the epoch's end


def test_a_stop_signal_during_an_epochs_last_step_first_ends_the_epoch_as_an_unstopped_run_does(tmp_path, monkeypatch):
    # A resumed run starts at the next epoch: the stopped one must keep, monitor and log its epoch first.
    ema_update, steps = mdra.ema_update, []

    def step_and_signal(online, offline, m):  # once per optimizer step, at its end
        ema_update(online, offline, m)
        steps.append(1)
        if len(steps) == 2:  # the last step of epoch 1 (2 steps per epoch)
            os.kill(os.getpid(), signal.SIGTERM)

    flags = ["--data", "synthetic:32", "--epochs", "2", "--keep-every", "1", "--knn-every", "1"]
    whole = run(tmp_path / "whole", *flags)
    monkeypatch.setattr(mdra, "ema_update", step_and_signal)
    with pytest.raises(SystemExit) as exc:
        run(tmp_path / "parts", *flags)
    assert exc.value.code == 128 + signal.SIGTERM and load(tmp_path / "parts" / "checkpoint.pth")["step"] == 2
    monkeypatch.undo()
    resumed = run(tmp_path / "parts", *flags)
    for key in ("online", "offline", "queue"):
        assert_same_state(load(resumed)[key], load(whole)[key], key)
    epochs = {name: [(r["epoch"], r["knn"]) for r in log_records(tmp_path / name) if r.get("event") == "epoch"]
              for name in ("whole", "parts")}
    assert epochs["parts"] == epochs["whole"] and len(epochs["whole"]) == 2
    kept = sorted(p.name for p in (tmp_path / "parts").glob("checkpoint_epoch*.pth"))
    assert kept == ["checkpoint_epoch0001.pth", "checkpoint_epoch0002.pth"]


@contextlib.contextmanager
def sigint_disposition(handler):
    """SIGINT as a process started in the foreground (Python's KeyboardInterrupt) or in the background
    by a script (ignored) has it, whatever this test process inherited."""
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_stop_signal_before_the_training_loop_acts_at_once_and_one_inside_it_waits_for_the_step(capsys):
    def interrupted_while_setting_up(args):
        os.kill(os.getpid(), signal.SIGINT)  # Python's own handler: KeyboardInterrupt here
        raise AssertionError("the signal did not stop the run")

    with sigint_disposition(signal.default_int_handler), pytest.raises(SystemExit) as exc:
        runtime.run_main(interrupted_while_setting_up, [], mdra.get_parser())
    assert exc.value.code == 128 + signal.SIGINT and capsys.readouterr().err == "mdra.py: interrupted\n"

    def stopped_inside_the_loop(args):
        runtime.defer_stop_signals()
        os.kill(os.getpid(), signal.SIGTERM)
        return "the loop went on to the end of its step"

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        runtime.run_main(stopped_inside_the_loop, [], mdra.get_parser())
    assert exc.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before


def test_a_run_started_with_sigint_ignored_keeps_ignoring_it_inside_the_loop_and_stops_on_sigterm():
    # `mdra.py ... &` in a script: the terminal's Ctrl-C is for the foreground job, not for this one.
    def signalled_inside_the_loop(args):
        runtime.defer_stop_signals()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        return "the loop went on to the end of its step"

    with sigint_disposition(signal.SIG_IGN):
        with pytest.raises(SystemExit) as exc:
            runtime.run_main(signalled_inside_the_loop, [], mdra.get_parser())
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert exc.value.code == 128 + signal.SIGTERM  # not 128 + SIGINT: that one was never taken


def test_running_out_of_memory_is_one_sentence_naming_the_flags_that_size_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # a queue of 2^40 keys of 256 float32: 1 PiB
        run(tmp_path, "--queue-size", str(2**40))
    assert exc.value.code == 1
    assert capsys.readouterr().err == ("mdra.py: error: out of memory (1 PiB more); lower --batch-size (raise "
                                       "--accum-steps to keep the batch), --img-size or --queue-size.\n")
    with pytest.raises(MemoryError) as numpy_error:
        np.empty(2**45)  # float64: 256 TiB
    gpu = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of ...")
    for error, sentence in ((numpy_error.value, "out of memory (256 TiB more)"), (gpu, "out of memory (20 MiB more)"),
                            (MemoryError(), "out of memory"), (RuntimeError("shape mismatch"), None),
                            (ValueError("can't allocate memory"), None)):
        assert runtime.out_of_memory(error) == sentence, error


def test_resuming_refuses_a_changed_recipe_and_accepts_a_changed_precision(tmp_path, capsys):
    run(tmp_path, "--max-steps", "1", "--amp", "bf16")
    for changed, message in ((["--seed", "5"], "--seed 0 -> 5"), (["--epochs", "7"], "--epochs 200 -> 7"),
                             (["--lr", "0.1"], "--lr 0.3 -> 0.1")):
        with pytest.raises(SystemExit) as exc:
            run(tmp_path, "--max-steps", "2", *changed)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and "comes from a different run" in err
    # Where and how it runs may change: here the autocast dtype, whose GradScaler state was empty.
    assert load(run(tmp_path, "--max-steps", "2", "--amp", "fp16", "--workers", "1"))["step"] == 2


def test_the_ablations_train_and_a_checkpoint_from_before_their_flags_resumes(tmp_path, capsys):
    ablated = load(run(tmp_path / "ablated", "--max-steps", "1", "--no-predictor", "--no-cross", "--sinkhorn-iters", "0"))
    assert ablated["step"] == 1 and not any(k.startswith("predictor.") for k in ablated["online"])
    assert all(r["loss"] > 0 for r in log_records(tmp_path / "ablated") if "loss" in r)
    with pytest.raises(SystemExit):  # the predictor is part of the run: its absence is a setting to keep
        run(tmp_path / "ablated", "--max-steps", "2", "--no-cross", "--sinkhorn-iters", "0")
    assert "--predictor False -> True" in capsys.readouterr().err

    path = run(tmp_path / "old", "--max-steps", "1")
    ckpt = load(path)
    assert any(k.startswith("predictor.") for k in ckpt["online"])
    del ckpt["args"]["predictor"], ckpt["args"]["cross"]  # as a checkpoint written before these flags
    torch.save(ckpt, path)
    with pytest.raises(SystemExit):  # it ran with their defaults: another value is another run
        run(tmp_path / "old", "--max-steps", "2", "--no-cross")
    assert "--cross True -> False" in capsys.readouterr().err
    assert load(run(tmp_path / "old", "--max-steps", "2"))["step"] == 2
    assert "resumed from" in capsys.readouterr().out


def test_a_checkpoint_of_an_earlier_version_resumes_ignoring_its_retired_settings_unless_they_changed_the_run(
        tmp_path, capsys):
    run(tmp_path / "whole", "--max-steps", "3")
    path = run(tmp_path / "old", "--max-steps", "1")
    ckpt = load(path)
    # What earlier versions wrote: flags since removed, at what this version does without them.
    ckpt["args"].update(one_pass=False, cuda_graph=True, sync_bn=False, gpu_aug=False, offline_view="same",
                        synthetic_size=1024, compile=None)
    del ckpt["args"]["hidden_dim"]  # older than --hidden-dim: it ran at the default
    torch.save(ckpt, path)
    with pytest.raises(SystemExit):
        run(tmp_path / "old", "--max-steps", "3")
    assert "--hidden-dim 4096 -> 32" in capsys.readouterr().err  # the default it ran at, against this run's
    ckpt["args"]["hidden_dim"] = 32
    torch.save(ckpt, path)
    resumed = load(run(tmp_path / "old", "--max-steps", "3"))
    for key in ("online", "offline", "queue", "queue_ptr", "optimizer"):
        assert_same_state(resumed[key], load(tmp_path / "whole" / "checkpoint.pth")[key], key)
    # A retired setting at a value this version cannot train as: the run cannot go on here.
    ckpt = load(path)
    ckpt["args"]["offline_view"] = "weak"
    torch.save(ckpt, path)
    with pytest.raises(SystemExit) as exc:
        run(tmp_path / "old", "--max-steps", "4")
    assert exc.value.code == 2 and capsys.readouterr().err == (
        f"mdra.py: error: {path} was trained with --offline-view weak, a setting this version no longer has; resume "
        "it with the version that wrote it.\n")


def test_resuming_refuses_images_that_changed_under_the_same_flags(tmp_path, capsys):
    from PIL import Image
    root = tmp_path / "images"
    for i in range(48):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (5 * i, 0, 0)).save(root / f"class{i % 2}" / f"{i:02d}.png")
    folder_run = ["--data", str(root), "--accum-steps", "1", "--img-size", "8"]
    run(tmp_path / "run", *folder_run, "--max-steps", "1")
    Image.new("RGB", (8, 8)).save(root / "class0" / "new.png")  # one more image
    (root / "class1" / "01.png").rename(root / "class1" / "renamed.png")  # and the same number, renamed
    for changed, then_now in ((lambda: None, "48 then, 49 now"),
                              (lambda: (root / "class0" / "new.png").unlink(), "48 then and now, under other names")):
        changed()
        with pytest.raises(SystemExit) as exc:
            run(tmp_path / "run", *folder_run, "--max-steps", "2")
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"comes from a run on other images ({then_now})" in err, err
    (root / "class1" / "renamed.png").rename(root / "class1" / "01.png")
    assert load(run(tmp_path / "run", *folder_run, "--max-steps", "2"))["step"] == 2


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss, calls = mdra.mdra_loss, []

    def loss_that_breaks_at_the_third_step(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(mdra, "mdra_loss", loss_that_breaks_at_the_third_step)
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "--epochs", "1", "--save-every", "2", "--log-every", "4")
    assert "non-finite" in str(exc.value.code) and "checkpoint.pth" in str(exc.value.code)
    assert load(tmp_path / "checkpoint.pth")["step"] == 2


def test_a_few_steps_on_real_fashion_mnist(tmp_path):
    if not Path(data.FASHION_MNIST_SYSTEM_DIR).is_dir():
        pytest.skip("the dataset-fashion-mnist package is not installed")
    # The defaults of the small-data preset and of the CPU, but a narrow network.
    path = mdra.main(["--data", "fashion-mnist", "--arch", "resnet10-w8", "--hidden-dim", "32", "--batch-size", "32",
                      "--queue-size", "64", "--max-steps", "2", "--workers", "0", "--log-every", "1", "--device", "cpu",
                      "--out-dir", str(tmp_path)])
    records = [r for r in log_records(tmp_path) if "pairs_per_s" in r]
    assert len(records) == 2 and all(0 < r["loss"] < 100 for r in records)
    ckpt = load(path)
    assert ckpt["args"]["img_size"] == 28 and ckpt["small_stem"] and ckpt["step"] == 2
    assert ckpt["args"]["accum_steps"] == 1  # the small-data preset
    assert ckpt["args"]["compile"] == "none" and ckpt["args"]["amp"] == "off"  # the CPU's: eager, float32


def test_compiled_step_computes_what_the_eager_step_computes(tmp_path):
    run(tmp_path / "eager", "--max-steps", "2")
    path = run(tmp_path / "compiled", "--max-steps", "2", "--compile", "--compile-backend", "aot_eager")
    eager = [r["loss"] for r in log_records(tmp_path / "eager") if "pairs_per_s" in r]
    compiled = [r["loss"] for r in log_records(tmp_path / "compiled") if "pairs_per_s" in r]
    assert compiled == pytest.approx(eager, rel=1e-4)
    ckpt = load(path)
    assert not any("_orig_mod" in k for k in list(ckpt["online"]) + list(ckpt["offline"]))


def test_torchrun_with_two_cpu_processes_whose_knn_monitor_evaluates_the_saved_network(tmp_path, capsys):
    result = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "mdra.py", *TINY,
                      "--data", "synthetic:128", "--queue-size", "256", "--epochs", "1", "--knn-every", "1",
                      "--compile", "loss", "--compile-backend", "aot_eager",  # the loss's all-reduces in its graph
                      "--out-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "world size 2" in result.stdout
    # No warning raised at a line of this project (torch's own, of its version, are not this test's business).
    assert not re.search(r"\b(mdra|runtime|knn|gpu_aug)\.py:\d+: \w*Warning", result.stderr), result.stderr[-2000:]
    ckpt = load(tmp_path / "checkpoint.pth")
    assert ckpt["step"] == 8 and ckpt["queue_ptr"] == 128  # global batches of 16 from both ranks went in
    assert [r["step"] for r in log_records(tmp_path) if "pairs_per_s" in r] == list(range(1, 9))
    # Without SyncBatchNorm each rank's BatchNorm statistics are its own; the monitor must use rank 0's.
    import eval_knn
    knn = eval_knn.main(["--ckpt", str(tmp_path / "checkpoint.pth"), "--k", "20", "--workers", "0",
                         "--out", str(tmp_path / "knn.json")])
    monitor = [r for r in log_records(tmp_path) if r.get("event") == "epoch"][-1]["knn"]
    assert monitor == {"top1@20": pytest.approx(knn[20][0]), "top5@20": pytest.approx(knn[20][1])}
    # Resumed by one process, BatchNorm would see batches of 16 instead of each rank's 8.
    with pytest.raises(SystemExit):
        run(tmp_path, "--data", "synthetic:128", "--queue-size", "256", "--epochs", "1", "--knn-every", "1")
    assert "was trained with BatchNorm over 8 images at a time and this run would use 16" in capsys.readouterr().err


def resolve_on_cpu_ranks(world_size, *flags):
    """mdra.resolve_args of TINY + flags as rank 0 of world_size CPU ranks, without launching them."""
    args = mdra.get_parser().parse_args([*TINY, *flags])
    _, info = data.build_dataset("synthetic:64", "data", "pretrain", 8)
    return mdra.resolve_args(args, info, runtime.DistEnv(0, world_size, 0, torch.device("cpu")))


def test_batch_not_divisible_by_world_size_is_refused():
    with pytest.raises(runtime.UsageError, match="--batch-size 15 is not divisible by the world size 2."):
        resolve_on_cpu_ranks(2, "--batch-size", "15")


@pytest.mark.parametrize("extra, message", [
    (["--data", "/no/such/folder"], "neither a data set name"),
    (["--queue-size", "100"], "--queue-size 100 is not a multiple of the global batch 16."),
    (["--groups", "3"], "--groups 3 does not divide the embedding dimension 256."),
    (["--arch", "vgg16"], "--arch vgg16 is not a torchvision ResNet"),
    (["--sinkhorn-iters", "-1"], "--sinkhorn-iters must be at least 0."),  # 0 is the ablation without balance
    (["--groups", "0"], "--groups must be at least 1."),
    (["--batch-size", "0"], "--batch-size must be at least 1."),  # not silently the default
    (["--queue-size", "-16"], "--queue-size must be at least 1."),
    (["--save-every", "0"], "--save-every must be at least 1."),
    (["--workers", "-1"], "--workers must be at least 0."),
    (["--tau", "0"], "--tau 0.0 must be positive."),
    (["--momentum", "1.5"], "--momentum 1.5 is not in [0, 1]."),
    (["--data", "synthetic:-5"], "--data synthetic:-5 must give between 1 and 1000000000 images."),
    (["--data", f"synthetic:{10**10}"], "--data synthetic:10000000000 must give between 1 and 1000000000 images."),
    (["--hidden-dim", "0"], "--hidden-dim must be at least 1."),
    (["--epochs", "5", "--warmup-epochs", "10"], "--warmup-epochs 10 does not fit in --epochs 5: the learning rate "
                                                 "would never reach its peak; give fewer warm-up epochs."),
    (["--epochs", "5", "--knn-every", "10"], "--knn-every 10 and --knn-subset 0 with --epochs 5: the kNN monitor "
                                             "would never run."),
    (["--knn-subset", "100"], "--knn-every 0 and --knn-subset 100 with --epochs 200: the kNN monitor would never run."),
    (["--arch", "resnet10-wide"], "--arch resnet10-wide is not a torchvision ResNet"),
    (["--compile", "--compile-backend", "bogus"], "--compile-backend 'bogus' is not a torch.compile backend"),
    (["--seed", str(2**32)], f"argument --seed: {2**32} is not between 0 and 2**32 - 1"),  # torch keeps 32 bits
    (["--lr", "1e300"], "argument --lr: 1e300 is beyond float32's range"),
])
def test_bad_input_is_one_sentence_and_exit_status_2(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, *extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    if "argument --" in message:  # argparse's own: its usage, then the sentence
        err = err.splitlines()[-1]
    assert err.startswith("mdra.py: error: ") and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("script, option", [("mdra", "--lr"), ("mdra", "--warmup-epochs"), ("finetune", "--lr"),
                                            ("eval_knn", "--temperature")])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_numbers_that_are_not_finite_are_refused_by_the_parser(script, option, value, capsys):
    parser = __import__(script).get_parser()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([f"{option}={value}"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"{script}.py: error: argument {option}: {value} is not a finite number"


@pytest.mark.parametrize("script", ["mdra", "finetune", "eval_knn"])
def test_every_script_refuses_a_crop_smaller_than_the_networks_downsampling_while_parsing(script, capsys):
    parser = __import__(script).get_parser()
    assert parser.parse_args(["--img-size", "8"]).img_size == 8
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--img-size", "2"])
    assert exc.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == (
        f"{script}.py: error: argument --img-size: 2 px is below 8, the smallest crop a ResNet here can process: "
        "even with the small stem it downsamples 8x")


def test_pretraining_takes_a_folder_of_one_class_but_its_knn_monitor_refuses_it(tmp_path, capsys):
    from PIL import Image
    for split, count in (("train", 16), ("val", 2)):
        (tmp_path / "images" / split / "all").mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (15 * i, 0, 0)).save(tmp_path / "images" / split / "all" / f"{i}.png")
    folder = ["--data", str(tmp_path / "images"), "--accum-steps", "1"]
    with pytest.raises(SystemExit) as exc:
        run(tmp_path / "monitored", *folder, "--knn-every", "1")
    assert exc.value.code == 2 and capsys.readouterr().err == (
        f"mdra.py: error: --knn-every's kNN monitor needs at least two classes; {tmp_path / 'images'} has 1, over "
        "which every answer is right (pretraining itself needs no labels: leave --knn-every out).\n")
    assert load(run(tmp_path / "plain", *folder, "--max-steps", "1"))["step"] == 1


def test_a_data_set_of_which_no_image_can_be_read_is_one_sentence(tmp_path, capsys):
    for i in range(40):
        (tmp_path / "images" / "train" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / "train" / f"class{i % 2}" / f"{i}.jpg").write_text("not a JPEG")
    # Found before the loader starts: from a worker, the error would come wrapped in its traceback.
    with pytest.raises(SystemExit) as exc:
        run(tmp_path / "run", "--data", str(tmp_path / "images"), "--accum-steps", "1", "--workers", "2")
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("mdra.py: error: none of the 40 images of the data set can be read, e.g. "
                                       f"{tmp_path}/images/train/class0/0.jpg: corrupt or not an image "
                                       "(of no format PIL knows).\n")


def test_the_first_five_unreadable_training_images_are_named_in_the_log_from_the_loader_workers(tmp_path, capsys):
    from PIL import Image
    train = tmp_path / "images" / "train"
    for i in range(32):
        (train / f"class{i // 16}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (8 * i, 0, 0)).save(train / f"class{i // 16}" / f"{i:02d}.png")
    bad = [f"class0/{i:02d}.png" for i in range(0, 14, 2)]  # 7, none followed by another: each skipped once
    for name in bad:
        (train / name).write_bytes(b"not a PNG")
    run(tmp_path / "run", "--data", str(tmp_path / "images"), "--accum-steps", "1", "--workers", "1", "--epochs", "1")
    lines = capsys.readouterr().out.splitlines()
    named = [line.removeprefix("skipped unreadable training image ") for line in lines
             if line.startswith("skipped unreadable training image ")]
    assert len(named) == 5 and len(set(named)) == 5
    assert {line.split(": ", 1)[0] for line in named} <= {str(train / name) for name in bad}
    assert all(line.endswith(": corrupt or not an image (of no format PIL knows)") for line in named)
    assert lines.count("skipped more than 5 unreadable training images: from here on they are only counted "
                       "(skipped in the log lines)") == 1
    step_lines = [line for line in lines if line.startswith("epoch 1/1 step ")]
    assert log_records(tmp_path / "run")[-1]["skipped_images"] == 7 and step_lines[-1].endswith(" skipped 7")


def test_a_crash_with_loader_workers_ends_the_process_with_its_traceback_instead_of_hanging(tmp_path):
    # The workers ignore SIGTERM, which is all that multiprocessing sends them at exit before waiting.
    crash_in_step_3 = ("import sys, mdra\n"
                       "loss, calls = mdra.mdra_loss, []\n"
                       "def crashing(*args, **kwargs):\n"
                       "    calls.append(1)\n"
                       "    if len(calls) == 3:\n"
                       "        raise RuntimeError('a crash in step 3')\n"
                       "    return loss(*args, **kwargs)\n"
                       "mdra.mdra_loss = crashing\n"
                       "mdra.main(sys.argv[1:])\n")
    proc = subprocess.Popen([sys.executable, "-c", crash_in_step_3, *TINY, "--workers", "2", "--epochs", "100",
                             "--out-dir", str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the hung run and its workers
        raise
    assert proc.returncode == 1 and err.splitlines()[-1] == "RuntimeError: a crash in step 3", err


def test_an_out_dir_taken_by_a_file_is_one_sentence(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    with pytest.raises(SystemExit) as exc:
        run(tmp_path / "taken")
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"mdra.py: error: --out-dir {tmp_path / 'taken'} is a file, not a folder.\n"


@pytest.mark.parametrize("out_dir, problem", [("/proc", "is not writable"), ("/proc/mdra-run", "cannot be created"),
                                              ("{read-only}", "is not writable"),
                                              ("{read-only}/run", "cannot be created")])
def test_an_out_dir_that_cannot_be_written_is_one_sentence_before_the_data_is_listed(
        out_dir, problem, tmp_path, make_read_only, monkeypatch, capsys):
    if "{read-only}" in out_dir:
        out_dir = out_dir.replace("{read-only}", str(make_read_only(tmp_path)))
    monkeypatch.setattr(data, "build_dataset", lambda *args: pytest.fail("the data was listed first"))
    with pytest.raises(SystemExit) as exc:
        run(out_dir)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"mdra.py: error: --out-dir {re.escape(out_dir)} {problem} \([A-Z][\w -]+\)\.\n", err), err


def test_a_second_run_on_the_same_out_dir_is_refused_naming_the_first_until_that_one_is_killed(tmp_path, capsys):
    ready, told = os.pipe()
    holder = os.fork()  # the first run, holding the lock as mdra.py does; faster than a new interpreter
    if holder == 0:
        try:
            runtime.lock_folder(tmp_path, "--out-dir")
            os.write(told, b"locked")
            time.sleep(120)
        finally:
            os._exit(0)
    try:
        assert os.read(ready, 6) == b"locked"
        with pytest.raises(SystemExit) as exc:
            run(tmp_path, "--max-steps", "1")
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mdra.py: error: --out-dir {tmp_path} is in use by another run (pid {holder} on "
                              f"{socket.gethostname()}, started ") and err.count("\n") == 1, err
        assert not (tmp_path / "log.jsonl").exists()
    finally:
        os.kill(holder, signal.SIGKILL)  # it cannot release anything itself
        os.waitpid(holder, 0)
    assert run(tmp_path, "--max-steps", "1") == tmp_path / "checkpoint.pth"


def test_a_forked_process_such_as_a_loader_worker_does_not_keep_the_lock_of_a_run_that_ended(tmp_path):
    runtime.lock_folder(tmp_path, "--out-dir")
    ready, told = os.pipe()
    worker = os.fork()
    if worker == 0:
        os.write(told, b"started")
        time.sleep(60)
        os._exit(0)
    try:
        assert os.read(ready, 7) == b"started"
        runtime._close_held_locks()  # the run ends, or is killed, while its worker lives on for a moment
        runtime.lock_folder(tmp_path, "--out-dir")
    finally:
        os.kill(worker, signal.SIGKILL)
        os.waitpid(worker, 0)
        runtime._close_held_locks()


def test_an_out_dir_on_a_file_system_without_locks_is_used_with_a_warning(tmp_path, monkeypatch, capsys):
    def no_locks(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    run(tmp_path, "--max-steps", "1")
    assert capsys.readouterr().err == (f"warning: --out-dir {tmp_path} cannot be locked (No locks available); "
                                       "a second run on it at the same time would not be refused.\n")


def test_a_checkpoint_newer_than_this_code_is_refused_naming_both_versions(tmp_path):
    torch.save({"format": "mdra", "version": 99}, tmp_path / "checkpoint.pth")
    with pytest.raises(runtime.UsageError) as error:
        runtime.load_checkpoint(tmp_path / "checkpoint.pth")
    assert str(error.value) == (f"{tmp_path / 'checkpoint.pth'} is a version 99 checkpoint and this code reads "
                                "versions up to 1; update the code to load it.")


def test_a_full_disk_is_one_sentence_that_keeps_the_last_good_checkpoint_and_frees_the_temporary_file(small_disk):
    path = small_disk / "checkpoint.pth"
    runtime.save_checkpoint({"weights": torch.ones(1000)}, path)
    with pytest.raises(runtime.UsageError) as error:
        runtime.save_checkpoint({"weights": torch.ones(1_000_000)}, path)  # 4 MB on a 1 MiB disk
    assert re.fullmatch(rf"no space left on {re.escape(str(small_disk))} for checkpoint.pth \(needs about 3.8 MB, "
                        rf"1.0 MB free\); {re.escape(str(path))} is kept as it was\.", str(error.value)), error.value
    assert os.listdir(small_disk) == ["checkpoint.pth"]
    assert torch.equal(load(path)["weights"], torch.ones(1000))


def test_a_disk_that_fills_up_during_training_ends_the_run_with_one_sentence_and_the_last_good_checkpoint(
        tmp_path, monkeypatch, capsys):
    save, saves = torch.save, []

    def fills_the_disk(*args, **kwargs):
        saves.append(args)
        if len(saves) == 2:  # as torch's zip writer says it: a RuntimeError of its own
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_the_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=2**40, used=2**40, free=0))
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "--max-steps", "4", "--save-every", "2")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    folder = re.escape(str(tmp_path))
    assert re.fullmatch(rf"mdra.py: error: no space left on {folder} for checkpoint.pth \(needs about \d+\.\d MB, "
                        rf"0.0 MB free\); {folder}/checkpoint.pth is kept as it was\.\n", err), err
    assert load(tmp_path / "checkpoint.pth")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.suffixes) == []


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), ValueError("not about space")])
def test_a_failed_write_leaves_the_file_as_it_was_and_only_a_full_disk_becomes_one_sentence(tmp_path, error):
    path = tmp_path / "knn.json"
    path.write_text("the last good one")
    with pytest.raises(runtime.UsageError if isinstance(error, OSError) else ValueError,
                       match=f"^no space left on {re.escape(str(tmp_path))} for knn.json|^not about space$"):
        with runtime.atomic_file(path, size=100) as tmp:
            tmp.write_text("half of it")
            raise error
    assert os.listdir(tmp_path) == ["knn.json"] and path.read_text() == "the last good one"


def test_the_file_written_before_it_replaces_another_ends_as_that_file_does_as_torch_export_save_expects(tmp_path,
                                                                                                      capfd):
    path = tmp_path / "classifier.pt2"
    program = torch.export.export(torch.nn.Linear(2, 1), (torch.ones(1, 2),))
    with runtime.atomic_file(path, size=100) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".tmp.pt2") and tmp.name != path.name
        torch.export.save(program, tmp)
    assert os.listdir(tmp_path) == ["classifier.pt2"] and "Expect archive file" not in capfd.readouterr().err
    x = torch.rand(1, 2)
    torch.testing.assert_close(torch.export.load(path).module()(x), program.module()(x))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "--device", "cuda")
    assert exc.value.code == 2 and "no CUDA GPU is available" in capsys.readouterr().err


def test_checkpoint_of_another_architecture_in_out_dir_is_refused_without_traceback(tmp_path):
    run(tmp_path, "--max-steps", "1")
    result = run_cli(["mdra.py", *TINY, "--arch", "resnet10-w16", "--out-dir", str(tmp_path)])
    assert result.returncode == 2
    assert "--arch resnet10-w8 -> resnet10-w16" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_checkpoint_in_out_dir_that_lacks_what_resuming_restores_is_named_in_one_sentence(tmp_path, capsys):
    saved = load(run(tmp_path / "run", "--max-steps", "1"))
    (tmp_path / "forked").mkdir()
    forked = {k: v for k, v in saved.items() if k not in ("queue", "optimizer")}
    torch.save(forked, tmp_path / "forked" / "checkpoint.pth")
    with pytest.raises(SystemExit) as exc:
        run(tmp_path / "forked", "--max-steps", "2")
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"mdra.py: error: {tmp_path / 'forked' / 'checkpoint.pth'} lacks optimizer, "
                                       "queue; it was not written by mdra.py.\n")
    # A fine-tuning's folder given as the pretraining's --out-dir: named as another script's, left as it was.
    (tmp_path / "fine-tuned").mkdir()
    classifier = {**saved, "format": "mdra-classifier"}
    torch.save(classifier, tmp_path / "fine-tuned" / "checkpoint.pth")
    with pytest.raises(SystemExit) as exc:
        run(tmp_path / "fine-tuned", "--max-steps", "2")
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"mdra.py: error: {tmp_path / 'fine-tuned' / 'checkpoint.pth'} in --out-dir is "
                                       "not a checkpoint of mdra.py (its format is 'mdra-classifier'): give mdra.py "
                                       "an --out-dir of its own.\n")
    assert load(tmp_path / "fine-tuned" / "checkpoint.pth")["format"] == "mdra-classifier"


def test_the_logged_commit_says_when_tracked_files_differ_from_it():
    root = Path(mdra.__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short=7", "HEAD")
    if not head:
        pytest.skip("not a git checkout")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    assert runtime.git_sha() == head + ("-dirty" if dirty else "")


def test_one_rank_under_torchrun_reduces_nothing(tmp_path, monkeypatch):
    # torchrun --nproc_per_node=1 starts a process group of one: no collective is issued, and the values are
    # those of a plain process.
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: pytest.fail("a collective of one rank"))
        x = torch.tensor([1.0, 2.0])
        assert runtime.all_reduce(x) is x and x.tolist() == [1.0, 2.0]
        scores = torch.randn(2, 8, 32, dtype=torch.float64)
        reduced = mdra.sinkhorn(scores)
    finally:
        torch.distributed.destroy_process_group()
    torch.testing.assert_close(reduced, mdra.sinkhorn(scores), rtol=0, atol=0)