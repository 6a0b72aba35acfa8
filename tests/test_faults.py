"""What users own is never written over, and faults are one sentence: outputs over files the tools did not
write, over their own inputs or among the user's images; stop signals (SIGHUP too); the debris of killed
runs and of failed starts; folders that vanish or are not what their names say; bytes that are not UTF-8."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import eval_knn
import finetune
import mdra
import runtime

REPO = Path(__file__).resolve().parents[1]
TINY = ["--no-compile", "--warmup-epochs", "1", "--data", "synthetic:64", "--img-size", "8", "--arch", "resnet10-w8", "--hidden-dim", "32", "--batch-size",
        "16", "--queue-size", "64", "--workers", "0", "--log-every", "1", "--device", "cpu", "--epochs", "1"]
HOST = socket.gethostname()


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def refused(main, argv, capsys):
    """The one sentence (after "prog: error: ") with which main(argv) exits with status 2."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    return err.split(": error: ", 1)[1].strip()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return mdra.main([*TINY, "--out-dir", str(tmp_path_factory.mktemp("pretrained"))])


@pytest.fixture(scope="module")
def classifier(pretrained, tmp_path_factory):
    return finetune.main(["--ckpt", str(pretrained), "--data", "synthetic:64", "--batch-size", "8", "--workers", "0",
                          "--label-fraction", "0.25", "--epochs", "1", "--out-dir", str(tmp_path_factory.mktemp("ft"))])


# ------------------------------------------------------------------------------------------------
# Outputs: only over what the same tool wrote, never over an input, never among the user's images
# ------------------------------------------------------------------------------------------------

def test_an_export_goes_over_an_earlier_export_but_never_over_its_checkpoint_or_another_file(classifier, tmp_path,
                                                                                             capsys):
    ckpt = tmp_path / "classifier-checkpoint.pt"  # a checkpoint named as a TorchScript export is
    shutil.copy(classifier, ckpt)
    message = refused(finetune.main, ["--ckpt", str(ckpt), "--export", str(ckpt)], capsys)
    assert message == f"--export {ckpt} is also what this run reads; it is not written over: give another path."
    assert ckpt.read_bytes() == classifier.read_bytes()
    model = tmp_path / "model.pt"
    torch.save({"weights": torch.ones(3)}, model)  # a checkpoint of the user's, also a zip of torch's
    assert refused(finetune.main, ["--ckpt", str(classifier), "--export", str(model)], capsys) == (
        f"--export {model} exists and is not a classifier exported by finetune.py; it is not written over: give "
        "another path or move it away.")
    assert torch.equal(load(model)["weights"], torch.ones(3))
    for suffix in (".pt2", ".pt"):  # an earlier export of its own is replaced
        export = tmp_path / f"classifier{suffix}"
        finetune.main(["--ckpt", str(classifier), "--export", str(export)])
        written = export.stat().st_mtime_ns
        finetune.main(["--ckpt", str(classifier), "--export", str(export)])
        assert export.stat().st_mtime_ns > written and finetune.is_export(export)


def test_a_knn_result_goes_over_an_earlier_result_but_never_over_an_input_or_another_json_file(pretrained, tmp_path,
                                                                                               capsys):
    notes = tmp_path / "notes.json"
    notes.write_text('{"my": "notes"}\n')  # a JSON object, as a result is, but none of this script's
    knn_flags = ["--ckpt", str(pretrained), "--k", "5", "--workers", "0"]
    assert refused(eval_knn.main, [*knn_flags, "--out", str(notes)], capsys) == (
        f"--out {notes} exists and is not a kNN result of eval_knn.py; it is not written over: give another path or "
        "move it away.")
    assert notes.read_text() == '{"my": "notes"}\n'
    assert refused(eval_knn.main, [*knn_flags, "--out", str(pretrained)], capsys) == (
        f"--out {pretrained} is also what this run reads; it is not written over: give another path.")
    result = tmp_path / "knn.json"
    eval_knn.main([*knn_flags, "--out", str(result), "--save-features", str(tmp_path / "features")])
    first = json.loads(result.read_text())
    eval_knn.main([*knn_flags, "--out", str(result)])  # an earlier result: replaced
    assert json.loads(result.read_text())["results"] == first["results"]
    # The features it saved are its own to replace, but not while it reads them, nor a file of another kind.
    assert refused(eval_knn.main, ["--load-features", str(tmp_path / "features"), "--k", "5", "--out", str(result),
                                   "--save-features", str(tmp_path / "features")], capsys) == (
        f"--save-features' {tmp_path / 'features' / 'train.pth'} is also what this run reads; it is not written over: "
        "give another path.")
    (tmp_path / "mine").mkdir()
    torch.save({"my": "tensors"}, tmp_path / "mine" / "val.pth")
    assert refused(eval_knn.main, [*knn_flags, "--out", str(result), "--save-features", str(tmp_path / "mine")],
                   capsys).startswith(f"--save-features' {tmp_path / 'mine' / 'val.pth'} exists and is not a feature file")


def test_a_pretraining_adds_to_its_own_log_lock_and_copies_but_never_to_files_of_another_kind(tmp_path, capsys):
    run = [*TINY, "--out-dir", str(tmp_path)]
    for name, content, what in (("log.jsonl", "my own notes\n", "a log.jsonl of this project"),
                                ("run.lock", "do not touch\n", "a run.lock of this project")):
        (tmp_path / name).write_text(content)
        assert refused(mdra.main, run, capsys) == (
            f"--out-dir's {tmp_path / name} exists and is not {what}; it is not written over: give another path or "
            "move it away.")
        assert (tmp_path / name).read_text() == content
        (tmp_path / name).unlink()
    torch.save({"my": "model"}, tmp_path / "checkpoint_epoch0001.pth")  # where --keep-every 1 would write
    assert refused(mdra.main, [*run, "--keep-every", "1"], capsys).startswith(
        f"--out-dir's {tmp_path / 'checkpoint_epoch0001.pth'} exists and is not a checkpoint of mdra.py")
    (tmp_path / "checkpoint_epoch0001.pth").unlink()
    mdra.main([*run, "--keep-every", "1", "--max-steps", "2"])
    mdra.main([*run, "--keep-every", "1"])  # the same run goes on: its log, lock and copies are its own
    assert load(tmp_path / "checkpoint_epoch0001.pth")["step"] == 4
    assert [json.loads(line).get("event") for line in (tmp_path / "log.jsonl").read_text().splitlines()].count(
        "start") == 2


def test_subset_txt_goes_over_its_own_but_never_over_the_subset_file_it_reads_or_a_file_of_the_users(pretrained,
                                                                                                       tmp_path, capsys):
    tune = ["--ckpt", str(pretrained), "--data", "synthetic:64", "--batch-size", "8", "--workers", "0", "--epochs", "1"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "subset.txt").write_text("my notes\n")
    assert refused(finetune.main, [*tune, "--label-fraction", "0.25", "--out-dir", str(tmp_path / "mine")], capsys) == (
        f"--out-dir's {tmp_path / 'mine' / 'subset.txt'} exists and is not a subset.txt of finetune.py; it is not "
        "written over: give another path or move it away.")
    assert (tmp_path / "mine" / "subset.txt").read_text() == "my notes\n"
    # The user's own split file, kept in the out-dir as subset.txt: read, never rewritten in this script's form.
    (tmp_path / "split").mkdir()
    split = tmp_path / "split" / "subset.txt"
    split.write_text("\n".join(str(i) for i in range(0, 64, 3)) + "\n")
    finetune.main([*tune, "--subset-file", str(split), "--out-dir", str(tmp_path / "split")])
    assert split.read_text() == "\n".join(str(i) for i in range(0, 64, 3)) + "\n"
    written = (tmp_path / "ft" / "subset.txt")
    finetune.main([*tune, "--label-fraction", "0.25", "--out-dir", str(tmp_path / "ft")])
    assert written.read_text().startswith(finetune.SUBSET_HEADER)  # its own: known again by its first line
    assert finetune.read_subset_file(written, [str(i) for i in range(64)]) == sorted(
        finetune.class_balanced_subset([i % 10 for i in range(64)], 0.25, 0))


@pytest.mark.parametrize("name", ["log.jsonl", "run.lock"])
def test_a_log_or_lock_that_is_a_folder_is_one_sentence(tmp_path, capsys, name):
    (tmp_path / name).mkdir()
    assert refused(mdra.main, [*TINY, "--out-dir", str(tmp_path)], capsys) == (
        f"--out-dir's {tmp_path / name} is a folder; give a file name.")


def test_nothing_is_written_among_the_users_images(tmp_path, capsys, pretrained):
    images = tmp_path / "images"  # an ImageFolder without train/: itself is the training split
    for i in range(4):
        (images / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(images / f"class{i % 2}" / f"{i}.png")
    listing = sorted(images.rglob("*"))
    assert refused(mdra.main, [*TINY, "--data", str(images), "--out-dir", str(images / "run")], capsys) == (
        f"--out-dir {images / 'run'} is inside the images of --data {images}; give a path outside them.")
    assert refused(finetune.main, ["--random-init", "--arch", "resnet10-w8", "--data", str(images), "--out-dir",
                                   str(images / "class0")], capsys).startswith(f"--out-dir {images / 'class0'} is inside")
    assert refused(eval_knn.main, ["--ckpt", str(pretrained), "--data", str(images), "--out",
                                   str(images / "knn.json")], capsys).startswith(f"--out {images / 'knn.json'} is inside")
    assert sorted(images.rglob("*")) == listing


# ------------------------------------------------------------------------------------------------
# Stop signals and the debris of killed runs and of failed starts
# ------------------------------------------------------------------------------------------------

def test_sighup_of_a_dropped_ssh_session_saves_at_the_end_of_the_step_and_exits_as_sigterm_does(tmp_path):
    proc = subprocess.Popen([sys.executable, "mdra.py", *TINY, "--epochs", "100", "--workers", "1", "--out-dir",
                             str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and '"step": 2' in log.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGHUP)  # the whole session, its loader worker too
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGHUP, err
    assert "stopped by a signal at step" in out
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if '"pairs_per_s"' in line]
    assert load(tmp_path / "checkpoint.pth")["step"] == steps[-1] >= 2
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_before_the_loop_ends_the_run_at_once_leaving_no_lock_or_folder_it_made(tmp_path, capsys, sig):
    def stopped_while_listing_the_data(args):
        runtime.take_out_dir(args.out_dir, runtime.setup_distributed("cpu"))
        os.kill(os.getpid(), sig)
        raise AssertionError("the signal did not stop the run")

    out_dir = tmp_path / "new"
    with pytest.raises(SystemExit) as exc:
        runtime.run_main(stopped_while_listing_the_data, ["--out-dir", str(out_dir)], mdra.get_parser())
    assert exc.value.code == 128 + sig and capsys.readouterr().err == f"mdra.py: stopped by {sig.name}\n"
    assert not out_dir.exists() and signal.getsignal(sig) is signal.SIG_DFL


def test_a_failed_start_removes_the_lock_and_folder_it_made_but_nothing_it_found(tmp_path, capsys):
    new = tmp_path / "new" / "run"
    refused(mdra.main, [*TINY, "--data", str(tmp_path / "typo"), "--out-dir", str(new)], capsys)
    assert not new.exists() and (tmp_path / "new").is_dir()  # only the folder the run itself made goes
    mdra.main([*TINY, "--out-dir", str(new), "--max-steps", "1"])
    refused(mdra.main, [*TINY, "--out-dir", str(new), "--lr", "0.1"], capsys)  # another run's folder: kept as found
    assert sorted(p.name for p in new.iterdir()) == ["checkpoint.pth", "log.jsonl", "run.lock"]
    (tmp_path / "empty").mkdir()
    refused(mdra.main, [*TINY, "--data", str(tmp_path / "typo"), "--out-dir", str(tmp_path / "empty")], capsys)
    assert (tmp_path / "empty").is_dir() and not list((tmp_path / "empty").iterdir())


def test_taking_the_out_dir_removes_the_temporary_files_of_dead_runs_of_this_host_only(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no process has now
    try:
        names = {"checkpoint.{}.tmp.pth".format(dead.pid): False,  # as earlier versions named it: removed
                 f"checkpoint.{HOST}@{dead.pid}.tmp.pth": False,
                 f"checkpoint_epoch0003.{HOST}@{dead.pid}.tmp.pth": False,
                 f"knn.{HOST}@{dead.pid}.tmp.json": False,
                 f"checkpoint.{HOST}@{sleeper.pid}.tmp.pth": True,  # a live process's
                 f"checkpoint.other-host@{dead.pid}.tmp.pth": True,  # another host's, which this one cannot see
                 "notes.tmp.txt": True}  # not a temporary file of this project's
        for name in names:
            (tmp_path / name).write_bytes(b"half a checkpoint")
        mdra.main([*TINY, "--out-dir", str(tmp_path), "--max-steps", "1"])
        assert {name: (tmp_path / name).exists() for name in names} == names
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_out_dir_deleted_while_the_run_writes_is_one_sentence(tmp_path, monkeypatch, capsys):
    ema_update, steps = mdra.ema_update, []

    def delete_the_folder_at_step_2(online, offline, m):
        ema_update(online, offline, m)
        steps.append(1)
        if len(steps) == 2:
            shutil.rmtree(tmp_path / "run")

    monkeypatch.setattr(mdra, "ema_update", delete_the_folder_at_step_2)
    assert refused(mdra.main, [*TINY, "--out-dir", str(tmp_path / "run")], capsys) == (
        f"cannot write {tmp_path / 'run' / 'log.jsonl'} (No such file or directory); the run's folder changed under it.")


# ------------------------------------------------------------------------------------------------
# Bytes that are not UTF-8
# ------------------------------------------------------------------------------------------------

def test_a_folder_and_command_line_with_bytes_that_are_not_utf8_work_and_so_does_a_log_with_them(tmp_path):
    out_dir = os.fsdecode(bytes(tmp_path) + b"/run-\xff")  # a name the file system allows, UTF-8 does not
    result = subprocess.run([sys.executable, "mdra.py", *TINY, "--max-steps", "2", "--out-dir", out_dir], cwd=REPO,
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    folder = Path(out_dir)
    assert load(folder / "checkpoint.pth")["step"] == 2
    assert (folder / "run.lock").read_bytes().rstrip().endswith(b"run-\xff'")  # the holder's command, as given
    with open(folder / "log.jsonl", "ab") as log:
        log.write(b'{"note": "\xff\xfe"}\n')  # a line of other bytes, as a crash or an editor may leave
    assert [r["step"] for r in runtime.logged_records(folder / "log.jsonl") if "loss" in r] == [1, 2]
