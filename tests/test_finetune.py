"""finetune.py: the labelled subset, fine-tuning and the linear probe, resume, export and predict,
and the errors a user can cause. Everything runs on CPU with tiny synthetic data."""
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import finetune
import mdra
import runtime

ROOT = Path(__file__).resolve().parents[1]
# The smallest network that proves what these tests prove: 8 channels after the stem, 1.3 MB pretrained.
ARCH = "resnet10-w8"
TINY = ["--data", "synthetic:64", "--batch-size", "8", "--workers", "0", "--log-every", "1"]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks gain nothing from threads, and on a shared CPU their contention costs seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A pretraining checkpoint from a real (tiny) mdra.py run, in this process (a process of its own would
    spend seconds importing torch)."""
    out = tmp_path_factory.mktemp("pretrain")
    return mdra.main(["--no-compile", "--warmup-epochs", "1", "--data", "synthetic:64", "--img-size", "16", "--arch", ARCH, "--hidden-dim", "32",
                      "--batch-size", "16", "--queue-size", "64", "--epochs", "1", "--workers", "0", "--out-dir", str(out)])


@pytest.fixture(scope="session")
def classifier(pretrained, tmp_path_factory):
    """A classifier fine-tuned for one epoch (two steps) on a quarter of the labels."""
    out = tmp_path_factory.mktemp("finetune")
    return finetune.main(["--ckpt", str(pretrained), *TINY, "--label-fraction", "0.25", "--epochs", "1",
                          "--out-dir", str(out)])


# ------------------------------------------------------------------------------------------------
# The labelled subset
# ------------------------------------------------------------------------------------------------

def test_label_fraction_takes_the_same_share_of_every_class_and_repeats_with_the_seed():
    targets = [i % 10 for i in range(1000)] + [3] * 100  # class 3 has 200 images, the others 100
    subset = finetune.class_balanced_subset(targets, 0.1, seed=0)
    assert Counter(targets[i] for i in subset) == {c: 20 if c == 3 else 10 for c in range(10)}
    assert subset == sorted(set(subset))
    assert subset == finetune.class_balanced_subset(targets, 0.1, seed=0)
    assert subset != finetune.class_balanced_subset(targets, 0.1, seed=1)
    assert finetune.class_balanced_subset(targets, 1.0, seed=0) == list(range(len(targets)))
    tiny = finetune.class_balanced_subset(targets, 1e-4, seed=0)  # every class keeps at least one image
    assert Counter(targets[i] for i in tiny) == {c: 1 for c in range(10)}


def test_held_out_images_are_outside_the_labelled_subset_and_class_balanced():
    targets = [i % 10 for i in range(1000)] + [3] * 100  # class 3 has 200 images, the others 100
    labelled = finetune.class_balanced_subset(targets, 0.1, seed=0)
    held_out = data.held_out_subset(targets, labelled, 220, seed=0)
    assert not set(held_out) & set(labelled) and held_out == sorted(set(held_out))
    # 220 of the 990 other images: the same share (2/9) of every class's 90 or 180 remaining ones
    assert Counter(targets[i] for i in held_out) == {c: 40 if c == 3 else 20 for c in range(10)}
    assert held_out == data.held_out_subset(targets, labelled, 220, seed=0)
    assert held_out != data.held_out_subset(targets, labelled, 220, seed=1)
    with pytest.raises(runtime.UsageError, match="--holdout 991 must be between 1 and the 990 training images it can hold out"):
        data.held_out_subset(targets, labelled, 991, seed=0)
    # Shares that are not whole: exactly `size` images all the same, each class's share rounded down or up.
    for size in (1, 7, 25, 333, 990):
        counts = Counter(targets[i] for i in data.held_out_subset(targets, labelled, size, seed=0))
        assert sum(counts.values()) == size
        assert all(abs(counts[c] - size * (180 if c == 3 else 90) / 990) < 1 for c in range(10)), (size, counts)
    # With all labels the held-out images leave the labelled set (subset.txt); a run given that subset and the
    # same --holdout holds out the same images, the only ones left.
    for size in (25, 333):
        held_out = data.held_out_subset(targets, [], size, seed=0)
        rest = sorted(set(range(len(targets))) - set(held_out))
        assert data.held_out_subset(targets, rest, size, seed=0) == held_out


def test_subset_file_selects_images_by_class_and_file_or_by_a_unique_file_name(tmp_path):
    names = ["n01440764/n01440764_10026.JPEG", "n01440764/n01440764_10027.JPEG", "n01443537/n01443537_2.JPEG",
             "n01443537/n01443537_7.JPEG"]  # an ImageFolder's names
    split = tmp_path / "1percent.txt"  # SimCLR's files name the file alone
    split.write_text("n01443537_7.JPEG\n\n  n01440764_10026.JPEG \nn01443537/n01443537_7.JPEG\n")
    assert finetune.read_subset_file(split, names) == [0, 3]
    # As a Windows editor saves it: a byte-order mark, CRLF line ends, and paths relative to the root.
    split.write_bytes("\ufeffn01443537_2.JPEG\r\n./n01440764/n01440764_10027.JPEG\r\n".encode("utf-8"))
    assert finetune.read_subset_file(split, names) == [1, 2]


def test_subset_txt_of_an_image_folder_whose_classes_reuse_file_names_reads_back(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / "train" / label / f"{i:03d}.png")
    images = data.ImageFiles(tmp_path / "train")
    assert images.names[:2] == ["cat/000.png", "cat/001.png"] and images.names[4] == "dog/000.png"
    chosen = finetune.class_balanced_subset(images.targets, 0.5, seed=0)
    (tmp_path / "subset.txt").write_text("".join(images.names[i] + "\n" for i in chosen))  # as finetune.py writes it
    assert finetune.read_subset_file(tmp_path / "subset.txt", images.names) == chosen


@pytest.mark.parametrize("content, names, message", [
    ("a.png\nz1.png\nz2.png\nz3.png\nz4.png\nz5.png\n", ["a.png", "b.png"],
     "names 5 images that are not in the training set, e.g. z1.png, z2.png, z3.png."),
    ("000.png\n", ["cat/000.png", "dog/000.png"], "names 1 images by a file name that occurs more than once"),
    ("\n \n", ["a.png"], "names no images."),
    (b"\xff\xd8\xff\xe0 a JPEG", ["a.png"], "cannot be read as text (UnicodeDecodeError)."),
    (None, ["a.png"], "does not exist or is not a file."),
], ids=["unknown names", "ambiguous name", "empty file", "binary file", "missing file"])
def test_subset_file_errors_say_what_is_wrong(tmp_path, content, names, message):
    split = tmp_path / "split.txt"
    if isinstance(content, bytes):
        split.write_bytes(content)
    elif content is not None:
        split.write_text(content)
    with pytest.raises(runtime.UsageError, match="--subset-file .*" + re.escape(message)):
        finetune.read_subset_file(split, names)


# ------------------------------------------------------------------------------------------------
# Fine-tuning and the linear probe
# ------------------------------------------------------------------------------------------------

def test_fine_tuning_writes_a_classifier_checkpoint_and_the_subset_that_repeats_it(pretrained, classifier):
    ckpt = load(classifier)
    for key in ("format", "version", "arch", "small_stem", "feature_dim", "args", "epoch", "step", "backbone",
                "head", "num_classes", "class_names", "mean", "std", "img_size"):
        assert key in ckpt
    assert (ckpt["format"], ckpt["arch"], ckpt["small_stem"], ckpt["img_size"]) == ("mdra-classifier", ARCH, True, 16)
    assert (ckpt["num_classes"], len(ckpt["class_names"]), ckpt["step"], ckpt["epoch"]) == (10, 10, 2, 1)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["backbone"])
    start = load(pretrained)["backbone"]
    assert not all(torch.equal(ckpt["backbone"][k], start[k]) for k in start)  # fine-tuning moves the backbone

    images, _ = data.build_dataset("synthetic:64", "", "train", 16)
    chosen = finetune.class_balanced_subset(images.targets, 0.25, seed=0)
    assert finetune.read_subset_file(classifier.parent / "subset.txt", images.names) == chosen
    epochs = [r for r in map(json.loads, (classifier.parent / "log.jsonl").read_text().splitlines())
              if r.get("event") == "epoch"]
    assert [(r["epoch"], r["eval_images"]) for r in epochs] == [(1, 16)]  # the whole synthetic val split
    assert 0 <= epochs[0]["top1"] <= epochs[0]["top5"] <= 100


def test_holdout_evaluates_held_out_training_images_at_the_epochs_asked_for(tmp_path):
    finetune.main(["--random-init", "--arch", ARCH, "--img-size", "16", *TINY, "--label-fraction", "0.25",
                   "--holdout", "24", "--epochs", "3", "--eval-every", "2", "--out-dir", str(tmp_path)])
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r.get("event") == "epoch"]
    images, _ = data.build_dataset("synthetic:64", "", "train", 16)
    held_out = data.held_out_subset(images.targets, finetune.class_balanced_subset(images.targets, 0.25, 0), 24, 0)
    assert [(r["epoch"], r["eval"], r["eval_images"]) for r in epochs] == [(2, "held-out", len(held_out)),
                                                                         (3, "held-out", len(held_out))]
    assert load(tmp_path / "checkpoint.pth")["metrics"] == {k: epochs[-1][k] for k in
                                                            ("epoch", "top1", "top5", "eval", "eval_images")}


def test_holdout_with_all_labels_takes_the_held_out_images_out_of_the_labelled_set(tmp_path):
    finetune.main(["--random-init", "--arch", ARCH, "--img-size", "16", *TINY, "--holdout", "16",
                   "--epochs", "1", "--out-dir", str(tmp_path)])
    images, _ = data.build_dataset("synthetic:64", "", "train", 16)
    held_out = data.held_out_subset(images.targets, [], 16, 0)
    labelled = finetune.read_subset_file(tmp_path / "subset.txt", images.names)
    assert sorted(labelled + held_out) == list(range(64)) and len(held_out) >= 10
    epochs = [r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if r.get("event") == "epoch"]
    assert [(r["eval"], r["eval_images"]) for r in epochs] == [("held-out", len(held_out))]


@pytest.mark.parametrize("lr, warnings", [("10", 1), ("0.01", 0)])
def test_a_loss_over_twice_chance_level_warns_once_that_the_lr_is_too_high(lr, warnings, tmp_path, capsys):
    finetune.main(["--random-init", "--arch", ARCH, "--img-size", "16", *TINY, "--label-fraction", "0.25",
                   "--epochs", "2", "--lr", lr, "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    losses = [float(line.split(" loss ")[1].split()[0]) for line in out.splitlines() if line.startswith("epoch") and " loss " in line]
    assert len(losses) == 4 and (max(losses) > 2 * math.log(10)) == bool(warnings)
    assert out.count("warning: the training loss") == warnings
    assert out.count("the learning rate is likely too high for this data; try a lower --lr") == warnings


def test_the_default_lr_is_0_03_on_the_named_small_data_sets_and_the_patents_0_3_otherwise_as_help_says(
        classifier, tmp_path):
    parser = finetune.get_parser()
    for argv, lr in ((["--data", "fashion-mnist"], 0.03), (["--data", "cifar100"], 0.03), ([], 0.03),
                     (["--data", "synthetic:64"], 0.03),  # a named data set with its size
                     (["--data", str(tmp_path)], 0.3), (["--data", "fashion-mnist", "--lr", "0.3"], 0.3)):
        assert finetune.resolve_sources(parser.parse_args(["--random-init", *argv]), None, {}).lr == lr, argv
    text = " ".join(parser.format_help().split())
    assert "default: 0.03 on the named small data sets" in text and "diverges" in text and "else 0.3" in text
    ckpt = load(classifier)  # fine-tuned on synthetic data without --lr, 2 steps
    head = ckpt["optimizer"]["param_groups"][0]
    assert ckpt["args"]["lr"] == 0.03 and head["lr"] == pytest.approx(0.03 * 0.5)  # the last step's: cosine at 1 of 2


def test_the_stem_is_the_checkpoints_else_small_on_small_data_sets_and_on_crops_up_to_64_px():
    # No --small-stem flag any more: the checkpoint's stem, else this rule, decides (a 16 px crop is refused
    # under the ImageNet stem: test_bad_input_...).
    parser, env = finetune.get_parser(), runtime.DistEnv(0, 1, 0, torch.device("cpu"))
    folder = data.DataInfo("photos", 2, ["a", "b"], 224, (0.5,) * 3, (0.25,) * 3, small=False)
    named = data.DataInfo("cifar10", 10, list("0123456789"), 32, (0.5,) * 3, (0.25,) * 3, small=True)
    for info, size, small_stem in ((folder, 64, True), (folder, 72, False), (folder, None, False), (named, 96, True)):
        argv = ["--random-init", "--arch", ARCH] + (["--img-size", str(size)] if size else [])
        args = finetune.resolve_args(finetune.resolve_sources(parser.parse_args(argv), None, {}), info, env, None)
        assert (args.small_stem, args.img_size) == (small_stem, size or 224), (info.name, size)
    start = {"arch": ARCH, "small_stem": False}  # pretrained on an image folder above 64 px
    args = finetune.resolve_sources(parser.parse_args(["--ckpt", "x.pth", "--img-size", "96"]), start, {})
    args = finetune.resolve_args(args, named, env, start)
    assert (args.arch, args.small_stem) == (ARCH, False)


def test_left_out_flags_take_the_resumed_runs_values_then_the_pretraining_checkpoints_then_the_defaults(pretrained):
    parser = finetune.get_parser()
    start = load(pretrained)  # synthetic:64, images of 16 px
    start["args"]["data_dir"] = "pretraining-data"

    def resolved(argv, resumed):
        args = finetune.resolve_sources(parser.parse_args(["--ckpt", str(pretrained), *argv]), start, resumed)
        return args.data, args.data_dir, args.img_size, args.lr

    assert resolved([], {}) == ("synthetic:64", "pretraining-data", 16, 0.03)
    assert resolved(["--data", "cifar10"], {}) == ("cifar10", "data", 16, 0.03)  # the size is still the backbone's
    # Another number of synthetic images is other data: its folder is not the pretraining's.
    assert resolved(["--data", "synthetic:32"], {}) == ("synthetic:32", "data", 16, 0.03)
    assert resolved(["--data", "/imagenet", "--img-size", "224"], {}) == ("/imagenet", "data", 224, 0.3)
    old = {"data": "fashion-mnist", "data_dir": "data", "img_size": 28, "lr": 0.3}
    assert resolved([], old) == ("fashion-mnist", "data", 28, 0.3)  # as that run was started
    assert resolved(["--lr", "0.1"], old)[-1] == 0.1  # given: the resume guard refuses it


def test_fine_tuning_takes_the_data_and_size_the_checkpoint_was_pretrained_on_where_none_is_given(pretrained, tmp_path):
    quick = ["--batch-size", "4", "--workers", "0", "--max-steps", "1"]
    tuned = load(finetune.main(["--ckpt", str(pretrained), *quick, "--out-dir", str(tmp_path / "synthetic")]))
    assert (tuned["args"]["data"], tuned["args"]["img_size"]) == ("synthetic:64", 16)
    # A checkpoint with only the keys spec section 8 promises (a fork's, say) gives its data and size by its args.
    promised = ("format", "version", "arch", "small_stem", "feature_dim", "args", "epoch", "step", "backbone")
    torch.save({k: v for k, v in load(pretrained).items() if k in promised}, tmp_path / "promised.pth")
    alike = load(finetune.main(["--ckpt", str(tmp_path / "promised.pth"), *quick, "--out-dir", str(tmp_path / "p")]))
    where = {"ckpt": None, "out_dir": None}
    assert {**alike["args"], **where} == {**tuned["args"], **where} and alike["img_size"] == 16
    for name, value in tuned["backbone"].items():
        assert torch.equal(alike["backbone"][name], value), name
    for split in ("train", "val"):
        for i in range(8):
            (tmp_path / "images" / split / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (30 * i, 0, 0)).save(tmp_path / "images" / split / f"class{i % 2}" / f"{i}.png")
    ckpt = load(pretrained)  # as if pretrained on that image folder at 12 px
    ckpt["args"], ckpt["img_size"] = {**ckpt["args"], "data": str(tmp_path / "images"), "img_size": 12}, 12
    torch.save(ckpt, tmp_path / "folder.pth")
    ckpt = load(finetune.main(["--ckpt", str(tmp_path / "folder.pth"), *quick, "--out-dir", str(tmp_path / "folder")]))
    assert (ckpt["args"]["data"], ckpt["img_size"], ckpt["class_names"]) == (str(tmp_path / "images"), 12,
                                                                           ["class0", "class1"])  # not 224


def test_linear_probe_trains_only_the_head_and_leaves_the_backbone_bit_identical(pretrained, classifier, tmp_path):
    split = classifier.parent / "subset.txt"  # the labelled images of the fine-tuning run, as a split file
    path = finetune.main(["--ckpt", str(pretrained), *TINY, "--subset-file", str(split), "--epochs", "1",
                          "--linear", "--out-dir", str(tmp_path)])
    assert (tmp_path / "subset.txt").read_text() == split.read_text()
    ckpt, start = load(path), load(pretrained)["backbone"]
    assert ckpt["backbone"].keys() == start.keys()
    assert all(torch.equal(ckpt["backbone"][k], start[k]) for k in start)  # BatchNorm statistics included
    torch.manual_seed(0)  # the head as it was initialised
    backbone, width = mdra.build_backbone(ARCH, True)
    initial = finetune.Classifier(backbone, width, 10, ckpt["mean"], ckpt["std"]).head.state_dict()
    assert not torch.equal(ckpt["head"]["weight"], initial["weight"])


def test_the_classifier_normalises_its_input_with_the_data_sets_statistics():
    import torchvision.transforms.functional as TF
    torch.manual_seed(0)
    backbone, width = mdra.build_backbone(ARCH, small_stem=True)
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)
    model = finetune.Classifier(backbone, width, 3, mean, std).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(backbone(TF.normalize(x, mean, std))))


def test_evaluation_runs_the_network_in_eval_mode_and_leaves_its_batchnorm_statistics_alone():
    torch.manual_seed(0)
    backbone, width = mdra.build_backbone(ARCH, small_stem=True)
    model = finetune.Classifier(backbone, width, 4, (0.5,) * 3, (0.25,) * 3)
    model.train()  # as the training loop leaves it
    batches = [(torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8), torch.randint(0, 4, (6,)), [""] * 6)
               for _ in range(3)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    top1, top5, counted = finetune.evaluate(model, batches, torch.device("cpu"), torch.contiguous_format,
                                            contextlib.nullcontext())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # running statistics too
    with torch.no_grad():  # reference: each image alone through the network in eval mode
        predictions = [model.eval()(image[None].float() / 255)[0].topk(4).indices for images, _, _ in batches
                       for image in images]
    labels = torch.cat([labels for _, labels, _ in batches])
    assert counted == 18
    assert top1 == pytest.approx(100 * sum(int(p[0] == y) for p, y in zip(predictions, labels)) / 18)
    assert top5 == 100.0  # 4 classes: every label is among the top 5


def test_linear_probe_check_rejects_a_backbone_that_moved():
    backbone, _ = mdra.build_backbone(ARCH, True)
    reference = {k: v.clone() for k, v in backbone.state_dict().items()}
    finetune.check_backbone_unchanged(backbone, reference)
    with torch.no_grad():
        backbone.layer1[0].bn1.running_mean[0] += 1e-6
    with pytest.raises(RuntimeError, match="changed the frozen backbone .*layer1.0.bn1.running_mean"):
        finetune.check_backbone_unchanged(backbone, reference)


def test_resuming_an_interrupted_run_gives_the_weights_of_an_uninterrupted_one(pretrained, tmp_path, monkeypatch):
    run = ["--ckpt", str(pretrained), *TINY, "--label-fraction", "0.25", "--epochs", "2",  # 2 steps per epoch
           "--lr-backbone", "0.03"]
    lr = ["--lr", "0.3"]  # as a run started when 0.3 was the default: resumed without --lr, it keeps its rate
    whole = load(finetune.main(run + lr + ["--out-dir", str(tmp_path / "whole")]))
    interrupted = load(finetune.main(run + lr + ["--out-dir", str(tmp_path / "parts"), "--max-steps", "3"]))
    assert interrupted["step"] == 3  # stopped inside the second epoch
    read, load_checkpoint = [], runtime.load_checkpoint
    monkeypatch.setattr(runtime, "load_checkpoint", lambda path, *a, **k: read.append(Path(path)) or
                        load_checkpoint(path, *a, **k))
    resumed = load(finetune.main(run + ["--out-dir", str(tmp_path / "parts")]))
    monkeypatch.undo()
    assert read.count(tmp_path / "parts" / "checkpoint.pth") == 1  # its settings and its state, read once
    logged = [r["step"] for r in map(json.loads, (tmp_path / "parts" / "log.jsonl").read_text().splitlines())
              if "loss" in r and "event" not in r]
    assert logged == [1, 2, 3, 4]  # the second run trained only the missing step
    assert resumed["step"] == whole["step"] == 4
    for part in ("backbone", "head"):
        assert all(torch.equal(resumed[part][k], whole[part][k]) for k in whole[part]), part
    assert resumed["metrics"] == whole["metrics"]
    head, backbone = whole["optimizer"]["param_groups"]  # the last step's rates: cosine at step 3 of 4
    assert (head["lr"], backbone["lr"]) == pytest.approx((0.3 * 0.5 * (1 + math.cos(math.pi * 3 / 4)),
                                                          0.03 * 0.5 * (1 + math.cos(math.pi * 3 / 4))))
    assert not torch.equal(whole["head"]["weight"], interrupted["head"]["weight"])


def test_an_epoch_stopped_after_its_last_step_is_evaluated_by_the_resumed_run(pretrained, tmp_path, monkeypatch):
    # The stop saves at once and the resumed run starts at the next epoch: it evaluates the one left behind.
    run = ["--ckpt", str(pretrained), *TINY, "--label-fraction", "0.25", "--epochs", "2"]  # 2 steps per epoch
    whole = load(finetune.main(run + ["--out-dir", str(tmp_path / "whole")]))
    check, signalled_at = runtime.exit_if_stop_requested, []

    def signal_and_check(control, save, log, step, ckpt_path):
        if step == signalled_at[-1]:
            os.kill(os.getpid(), signal.SIGTERM)
        check(control, save, log, step, ckpt_path)

    monkeypatch.setattr(runtime, "exit_if_stop_requested", signal_and_check)
    for step in (2, 4):  # the last steps of epoch 1 and of the final epoch
        signalled_at.append(step)
        with pytest.raises(SystemExit) as exc:
            finetune.main(run + ["--out-dir", str(tmp_path / "parts")])
        assert exc.value.code == 128 + signal.SIGTERM
    monkeypatch.undo()
    resumed = load(finetune.main(run + ["--out-dir", str(tmp_path / "parts")]))  # nothing left to train
    assert resumed["step"] == 4 and resumed["metrics"] == whole["metrics"]
    for part in ("backbone", "head"):
        assert all(torch.equal(resumed[part][k], whole[part][k]) for k in whole[part]), part
    epochs = {name: [(r["epoch"], r["step"], r["top1"], r["top5"])
                     for r in map(json.loads, (tmp_path / name / "log.jsonl").read_text().splitlines())
                     if r.get("event") == "epoch"] for name in ("whole", "parts")}
    assert epochs["parts"] == epochs["whole"] and len(epochs["whole"]) == 2


def test_resuming_with_another_start_subset_or_learning_rate_is_refused_and_leaves_the_run_alone(
        pretrained, classifier, capsys):
    finished = ["--ckpt", str(pretrained), *TINY, "--label-fraction", "0.25", "--epochs", "1",
                "--out-dir", str(classifier.parent)]  # the classifier fixture's run
    subset = (classifier.parent / "subset.txt").read_text()
    other = classifier.parent.parent / "other.pth"
    other.write_bytes(pretrained.read_bytes())
    for changed, message in ((["--ckpt", str(other)], f"--ckpt {pretrained} -> {other}"),
                             (["--label-fraction", "0.5"], "--label-fraction 0.25 -> 0.5"),
                             (["--lr", "0.1"], "--lr 0.03 -> 0.1")):
        with pytest.raises(SystemExit) as exc:
            finetune.main(finished + changed)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and "comes from a different run" in err, err
    assert (classifier.parent / "subset.txt").read_text() == subset  # still the finished run's images


def test_resuming_refuses_a_labelled_subset_whose_images_changed_under_the_same_flags(tmp_path, capsys):
    command = [*image_folder(tmp_path / "images"), "--workers", "0", "--label-fraction", "0.5",
               "--out-dir", str(tmp_path / "run")]
    finetune.main([*command, "--max-steps", "1"])
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "train" / "class0" / "new.png")  # the class-balanced half changes
    with pytest.raises(SystemExit) as exc:
        finetune.main([*command, "--max-steps", "2"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "comes from a run on other images (8 then, 9 now)" in err, err


def image_folder(root, train=16, val=4):
    """An ImageFolder of 8-px images in two classes: train/ and val/ under root (which no --out-dir may be in)."""
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            (root / split / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (15 * i, 0, 0)).save(root / split / f"class{i % 2}" / f"{i:02d}.png")
    return ["--random-init", "--arch", ARCH, "--data", str(root), "--img-size", "8", "--batch-size", "4"]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_an_unreadable_evaluation_image_is_named_in_one_sentence_after_the_epoch_it_evaluated_is_saved(
        tmp_path, capsys, workers):
    command = image_folder(tmp_path / "images")
    damaged = tmp_path / "images" / "val" / "class1" / "03.png"  # sorted after the readable ones
    png = damaged.read_bytes()
    damaged.write_bytes(png[:png.index(b"IDAT") + 8])  # its header opens, its pixel data ends early
    with pytest.raises(SystemExit) as exc:
        finetune.main([*command, "--workers", workers, "--epochs", "2", "--out-dir", str(tmp_path / "run")])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"finetune.py: error: 1 images of the evaluation split cannot be read, e.g. "
                                       f"{damaged}: corrupt or not an image (OSError: image file is truncated); "
                                       "remove or replace them, then run the same command again.\n")
    saved = load(tmp_path / "run" / "checkpoint.pth")
    assert saved["step"] == 4  # the first epoch's steps are kept
    assert saved["small_stem"]  # an image folder cropped to 8 px, up to 64: the small stem without being asked


def test_an_evaluation_image_that_cannot_be_opened_is_refused_before_the_first_epoch(tmp_path, capsys):
    command = image_folder(tmp_path / "images")
    (tmp_path / "images" / "val" / "class1" / "03.png").write_bytes(b"half a PNG")
    with pytest.raises(SystemExit) as exc:
        finetune.main([*command, "--workers", "2", "--epochs", "2", "--out-dir", str(tmp_path / "run")])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("finetune.py: error: 1 images of the evaluation split cannot be read, e.g. "
                                       f"{tmp_path}/images/val/class1/03.png: corrupt or not an image (of no format PIL "
                                       "knows); remove or replace them, then run the same command again.\n")
    assert not (tmp_path / "run" / "checkpoint.pth").exists()  # no epoch was trained


def test_the_eta_counts_the_evaluations_still_due_at_the_time_those_done_took(tmp_path, monkeypatch, capsys):
    evaluate, pause = finetune.evaluate, 0.6

    def slow_evaluate(*args):  # an evaluation that costs far more than the training steps
        time.sleep(pause)
        return evaluate(*args)

    monkeypatch.setattr(finetune, "evaluate", slow_evaluate)
    finetune.main(["--random-init", "--arch", ARCH, *TINY, "--img-size", "16", "--label-fraction", "0.25",
                   "--lr", "0.01", "--epochs", "2", "--out-dir", str(tmp_path)])  # 2 steps per epoch
    steps = [r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "eta_s" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    third, fourth = (r["eta_s"] for r in steps[2:])  # after the first evaluation, which was timed
    assert third >= pause and fourth >= pause  # the last evaluation is still due at both
    assert fourth <= third + 0.3  # no jump up; it was the training time alone, 0 at the last step
    printed = [line.split(" eta ")[1].split()[0] for line in capsys.readouterr().out.splitlines() if " eta " in line]
    assert [eta.startswith("~") for eta in printed] == [True, True, False, False]  # estimated before the first


def test_non_finite_loss_stops_with_a_clear_error_before_saving_it(tmp_path):
    with pytest.raises(SystemExit, match="finetune.py: error: the loss became non-finite between steps"):
        finetune.main(["--random-init", "--arch", ARCH, *TINY, "--img-size", "16", "--label-fraction", "0.25",
                       "--epochs", "2", "--lr", "1e30", "--out-dir", str(tmp_path)])
    assert not (tmp_path / "checkpoint.pth").exists() or all(
        torch.isfinite(v).all() for v in load(tmp_path / "checkpoint.pth")["head"].values())


@pytest.mark.parametrize("flag", ["--out-dir", "--export"])
def test_an_output_folder_that_cannot_be_written_is_one_sentence_before_the_data_is_listed(
        flag, tmp_path, make_read_only, monkeypatch, capsys):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    make_read_only(read_only)
    monkeypatch.setattr(data, "build_dataset", lambda *args: pytest.fail("the data was listed first"))
    outputs, subject = {
        "--out-dir": (["--out-dir", str(read_only / "run")], f"--out-dir {read_only / 'run'} cannot be created"),
        "--export": (["--out-dir", str(tmp_path / "run"), "--export", str(read_only / "model.pt")],
                     f"--export's folder {read_only} is not writable")}[flag]
    with pytest.raises(SystemExit) as exc:
        finetune.main(["--random-init", *TINY, *outputs])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"finetune.py: error: {re.escape(subject)} \([A-Z][\w -]+\)\.\n", err), err


def test_a_second_run_on_the_same_out_dir_is_refused_naming_the_first(tmp_path, monkeypatch, capsys):
    runtime.lock_folder(tmp_path, "--out-dir")  # as a first run in this process would hold it
    monkeypatch.setattr(data, "build_dataset", lambda *args: pytest.fail("the data was listed first"))
    with pytest.raises(SystemExit) as exc:
        finetune.main(["--random-init", *TINY, "--out-dir", str(tmp_path)])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith(f"finetune.py: error: --out-dir {tmp_path} is in use by another run "
                                              f"(pid {os.getpid()} on ")
    assert not runtime.HELD_LOCKS  # run_main let go of it


# ------------------------------------------------------------------------------------------------
# Classifying images
# ------------------------------------------------------------------------------------------------

LOAD_WITHOUT_THE_PROJECT = """
import sys
import torch
for name in ("mdra", "finetune"):
    try:
        __import__(name)
    except ImportError:
        continue
    sys.exit(name + " is importable")
images = torch.load("images.pt")
pt_meta, pt2_meta = {"classifier.json": ""}, {"classifier.json": ""}
scripted = torch.jit.load("classifier.pt", _extra_files=pt_meta)
program = torch.export.load("classifier.pt2", extra_files=pt2_meta).module()
torch.save({"meta": [pt_meta["classifier.json"], pt2_meta["classifier.json"]],
            "pt": {k: scripted(x) for k, x in images.items()},
            "pt2": {k: program(x) for k, x in images.items()}}, "outputs.pt")
"""


@pytest.fixture(scope="session")
def exported(classifier, tmp_path_factory):
    """A folder holding the classifier fixture exported as classifier.pt and classifier.pt2."""
    out = tmp_path_factory.mktemp("exported")
    for suffix in (".pt", ".pt2"):
        finetune.main(["--ckpt", str(classifier), "--export", str(out / f"classifier{suffix}")])
    return out


def test_exported_classifiers_equal_the_eager_one_and_load_without_this_project(classifier, exported, tmp_path):
    for suffix in (".pt", ".pt2"):
        (tmp_path / f"classifier{suffix}").write_bytes((exported / f"classifier{suffix}").read_bytes())
    ckpt = load(classifier)
    eager = finetune.load_classifier(ckpt, classifier)
    g = torch.Generator().manual_seed(0)
    images = {"batch of 3": torch.rand(3, 3, 16, 16, generator=g), "batch of 1": torch.rand(1, 3, 16, 16, generator=g),
              "larger images": torch.rand(2, 3, 24, 20, generator=g)}
    torch.save(images, tmp_path / "images.pt")
    (tmp_path / "load.py").write_text(LOAD_WITHOUT_THE_PROJECT)
    env = {k: v for k, v in ONE_THREAD.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", "load.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    outputs = torch.load(tmp_path / "outputs.pt", weights_only=True)
    for meta in outputs["meta"]:
        assert json.loads(meta)["class_names"] == ckpt["class_names"]
    with torch.no_grad():
        for name, x in images.items():
            expected = eager(x)
            for kind in ("pt", "pt2"):
                got = outputs[kind][name]
                assert got.shape == expected.shape == (x.shape[0], 10)
                assert ((got - expected).norm() / expected.norm()).item() < 1e-5, (kind, name)


def test_the_classifier_and_its_exports_refuse_images_that_are_not_float32_rgb_batches(classifier, exported):
    eager = finetune.load_classifier(load(classifier), classifier)
    scripted = torch.jit.load(exported / "classifier.pt")
    program = torch.export.load(exported / "classifier.pt2").module()
    refusal = r"the classifier takes float32 images in \[0, 1\] shaped \[N, 3, H, W\] \(RGB pixels / 255\); this input is"
    guard = re.escape("Guard failed: images.size()[1] == 3")
    for images, pt2_message in [(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8), "Tensor dtype mismatch"),
                                (torch.rand(2, 3, 16, 16, dtype=torch.float64), "Tensor dtype mismatch"),
                                (torch.rand(2, 1, 16, 16), guard),  # one grey channel
                                (torch.rand(3, 16, 16), guard)]:  # one image without a batch dimension
        with pytest.raises(ValueError, match=refusal + f" (not )?float32, shaped {re.escape(str(list(images.shape)))}."):
            eager(images)
        with pytest.raises(torch.jit.Error, match=refusal):
            scripted(images)
        with pytest.raises((RuntimeError, AssertionError), match=pt2_message):  # a .pt2 keeps no Python: torch's words
            program(images)


def test_the_readmes_loading_snippet_classifies_an_image_file_as_predict_does(classifier, exported, tmp_path,
                                                                            monkeypatch, capsys):
    readme = (ROOT / "docs" / "finetuning.md").read_text()  # the snippet the README points to
    snippet, = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "classifier.json" in block]
    g = np.random.default_rng(0)
    Image.fromarray(g.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "photo.png")  # resized and cropped
    (tmp_path / "classifier.pt2").write_bytes((exported / "classifier.pt2").read_bytes())
    monkeypatch.chdir(tmp_path)
    finetune.main(["--ckpt", str(classifier), "--predict", "photo.png"])
    top = capsys.readouterr().out.split(": ", 1)[1].split(", ")[0]  # "class3 0.412"
    exec(snippet, {})
    assert capsys.readouterr().out == top + "\n"


def test_predict_prints_the_five_most_probable_classes_of_png_files(classifier, tmp_path, capsys):
    images, _ = data.build_dataset("synthetic:64", "", "val", 16)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        images[i][0].save(folder / f"image{i}.png")
    (folder / "notes.txt").write_text("not an image: a folder's other files are left out")
    grey = tmp_path / "grey.png"
    Image.fromarray(np.arange(600, dtype=np.uint8).reshape(20, 30)).save(grey)
    for flags, message in ((["--predict", str(folder), "--batch-size", "0"], "--batch-size must be at least 1."),
                           (["--predict", str(folder), "--batch-size", "-1"], "--batch-size must be at least 1."),
                           (["--predict", ""], "--predict got an empty path."),  # not the working directory
                           (["--export", str(folder)], f"--export {folder} is a folder; give a file name")):
        with pytest.raises(SystemExit) as exc:
            finetune.main(["--ckpt", str(classifier), *flags])
        assert exc.value.code == 2 and f"error: {message}" in capsys.readouterr().err
    finetune.main(["--ckpt", str(classifier), "--predict", str(folder), str(grey)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(folder / f"image{i}.png") for i in range(3)] + [str(grey)]

    ckpt = load(classifier)
    model = finetune.load_classifier(ckpt, classifier)
    for i, line in enumerate(lines):
        ranked = [item.rsplit(" ", 1) for item in line.split(": ", 1)[1].split(", ")]
        names, probs = [n for n, _ in ranked], [float(p) for _, p in ranked]
        assert len(set(names)) == 5 and set(names) <= set(ckpt["class_names"])
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-3
        if i < 3:  # a 16 px image is classified as it is: no resize, no crop
            pixels = torch.from_numpy(np.array(images[i][0])).permute(2, 0, 1)[None].float() / 255
            with torch.no_grad():
                expected = model(pixels).softmax(dim=1)[0].topk(5)
            assert names == [ckpt["class_names"][c] for c in expected.indices.tolist()]
            assert probs == pytest.approx(expected.values.tolist(), abs=1e-3)


def test_predict_classifies_each_file_once_where_it_is_first_named(tmp_path):
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for name in ("a.png", "b.png", "more/c.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
    files = finetune.image_files([folder / "b.png", folder, tmp_path / "photos" / ".." / "photos" / "a.png", folder / "more"])
    assert files == [folder / "b.png", folder / "a.png", folder / "more" / "c.png"]


def test_predict_names_each_unreadable_file_classifies_the_others_and_then_exits_with_status_2(
        classifier, tmp_path, capsys):
    images, _ = data.build_dataset("synthetic:64", "", "val", 16)
    images[0][0].save(tmp_path / "2-good.png")
    (tmp_path / "0-junk.png").write_bytes(b"half a PNG")
    (tmp_path / "1-empty.jpg").write_bytes(b"")
    finetune.main(["--ckpt", str(classifier), "--predict", str(tmp_path / "2-good.png")])
    alone = capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # two files a batch: the first batch has nothing to classify
        finetune.main(["--ckpt", str(classifier), "--predict", str(tmp_path), "--batch-size", "2"])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == alone
    assert err.splitlines() == [
        f"{tmp_path / '0-junk.png'}: cannot be read (cannot identify image file '{tmp_path / '0-junk.png'}')",
        f"{tmp_path / '1-empty.jpg'}: cannot be read (cannot identify image file '{tmp_path / '1-empty.jpg'}')",
        "finetune.py: error: 2 of the 3 files given to --predict cannot be read (named above); "
        "the others are classified above."]


@pytest.mark.parametrize("action", ["--export", "--predict"])
def test_export_or_predict_with_a_pretraining_checkpoint_stops_at_once_saying_how_to_fine_tune_it(
        action, pretrained, tmp_path, capsys):
    Image.new("RGB", (16, 16)).save(tmp_path / "image.png")
    target = {"--export": tmp_path / "model.pt", "--predict": tmp_path / "image.png"}[action]
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        finetune.main(["--ckpt", str(pretrained), *TINY, "--max-steps", "1", "--out-dir", str(run), action, str(target)])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        f"finetune.py: error: {pretrained} is a pretraining checkpoint, not a classifier: fine-tune it first "
        f"(python3 finetune.py --ckpt {pretrained} --label-fraction 0.01 --out-dir {run}), then --export or "
        f"--predict with --ckpt {run}/checkpoint.pth.\n")
    assert not run.exists() and not (tmp_path / "model.pt").exists()


def test_export_and_predict_of_a_classifier_refuse_the_flags_they_would_ignore(classifier, tmp_path, capsys):
    image = tmp_path / "image.png"
    Image.new("RGB", (16, 16)).save(image)
    with pytest.raises(SystemExit) as exc:
        finetune.main(["--ckpt", str(classifier), "--predict", str(image), "--epochs", "5", "--lr", "9", "--data", "cifar10"])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert not out and err == (f"finetune.py: error: --data, --epochs, --lr have no effect on --export and --predict "
                               f"of the fine-tuned classifier {classifier}, whose data, size and training are fixed; "
                               "leave them out.\n")
    finetune.main(["--ckpt", str(classifier), "--predict", str(image), "--device", "cpu", "--batch-size", "2",
                   "--workers", "0"])  # the flags prediction uses
    assert capsys.readouterr().out.startswith(f"{image}: ")


# ------------------------------------------------------------------------------------------------
# Errors a user can cause: one sentence and exit status 2
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_inputs(pretrained, classifier, tmp_path_factory):
    """The files the bad-input cases name, made once: every case refuses them without writing there."""
    folder = tmp_path_factory.mktemp("bad-inputs")
    torch.save({"format": "something-else"}, folder / "foreign.pth")
    for split, i in [("train", i) for i in range(20)] + [("val", 0), ("val", 1)]:
        (folder / "unreadable" / split / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / "unreadable" / split / f"class{i % 2}" / f"{i}.jpg").write_text("not a JPEG")
    for split in ("train", "val"):
        (folder / "one-class" / split / "all").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / "one-class" / split / "all" / "0.png")
    torch.save({k: v for k, v in load(classifier).items() if k not in ("head", "resize")}, folder / "no-head.pth")
    torch.save({k: v for k, v in load(pretrained).items() if k != "backbone"}, folder / "no-backbone.pth")
    imagenet_stem, _ = mdra.build_backbone(ARCH, small_stem=False)  # as pretrained above 64 px on an image folder
    torch.save({**load(pretrained), "small_stem": False, "backbone": imagenet_stem.state_dict()},
               folder / "imagenet-stem.pth")
    return folder


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "{pretrained}", "--label-fraction", "0"], "--label-fraction 0.0 is not in (0, 1]."),
    (["--ckpt", "{pretrained}", "--label-fraction", "1.5"], "--label-fraction 1.5 is not in (0, 1]."),
    (["--ckpt", "{pretrained}", "--label-fraction", "0.1", "--subset-file", "x.txt"], "not both"),
    ([], "give either --ckpt"),
    (["--ckpt", "{pretrained}", "--random-init"], "give either --ckpt"),
    (["--ckpt", "{tmp}/missing.pth"], "missing.pth does not exist."),
    (["--ckpt", "{tmp}/foreign.pth"], "has format 'something-else'; expected 'mdra' or 'mdra-classifier'."),
    (["--ckpt", "{classifier}"], "is already a fine-tuned classifier"),
    (["--ckpt", "{pretrained}", "--out-dir", "{pretrained_dir}"],  # the pretraining's folder, left as it was
     "{pretrained} in --out-dir is not a checkpoint of finetune.py (its format is 'mdra'): give finetune.py an "
     "--out-dir of its own."),
    (["--ckpt", "{classifier}", "--export", "{tmp}/model.onnx"], "must end in .pt2 (torch.export) or .pt (TorchScript)."),
    (["--ckpt", "{tmp}/no-head.pth", "--export", "{tmp}/model.pt"], "no-head.pth lacks head, resize; it was not written by finetune.py."),
    (["--ckpt", "{tmp}/no-backbone.pth"], "no-backbone.pth lacks backbone; it was not written by mdra.py."),
    (["--ckpt", "{classifier}", "--predict", "{tmp}/missing.png"], "--predict {tmp}/missing.png does not exist."),
    (["--random-init", "--data", "{tmp}/no-such-folder"], "is neither a data set name"),
    (["--ckpt", "{pretrained}", "--arch", "resnet34"], "--arch resnet34 does not match the checkpoint's " + ARCH),
    (["--ckpt", "{pretrained}", "--subset-file", "{tmp}/missing.txt"], "--subset-file {tmp}/missing.txt does not exist or is not a file."),
    (["--ckpt", "{pretrained}", "--linear", "--lr-backbone", "0.01"], "--lr-backbone has no effect with --linear"),
    (["--ckpt", "{pretrained}", "--label-fraction", "0.1", "--batch-size", "64"], "fewer than one batch of 64"),
    (["--ckpt", "{pretrained}", "--label-fraction", "0.5", "--holdout", "31"], "--holdout 31 must be between 1 and the 30 "),
    (["--ckpt", "{pretrained}", "--eval-every", "0"], "--eval-every must be at least 1."),
    (["--ckpt", "{pretrained}", "--lr", "-1"], "--lr must be at least 0."),
    (["--ckpt", "{pretrained}", "--out-dir", "{tmp}/foreign.pth"], "--out-dir {tmp}/foreign.pth is a file, not a folder."),
    (["--ckpt", "{classifier}", "--export", "{tmp}/foreign.pth/model.pt"],
     "--export's folder {tmp}/foreign.pth is a file, not a folder."),
    (["--random-init", "--arch", ARCH, "--data", "{tmp}/unreadable", "--workers", "2"],
     "none of the 20 images of the data set can be read, e.g. {tmp}/unreadable/train/class0/0.jpg: corrupt or not an "
     "image (of no format PIL knows)."),
    (["--random-init", "--data", "{tmp}/one-class"], "fine-tuning needs at least two classes; {tmp}/one-class has 1"),
    (["--ckpt", "{tmp}/imagenet-stem.pth", "--img-size", "16"],
     "--img-size 16 is below 32, the smallest crop the ImageNet stem's network can process"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_bad_input_ends_with_one_sentence_and_exit_status_2(argv, message, pretrained, classifier, bad_inputs, tmp_path,
                                                          capsys):
    places = {"{pretrained}": str(pretrained), "{pretrained_dir}": str(pretrained.parent),
              "{classifier}": str(classifier), "{tmp}": str(bad_inputs)}
    for key, value in places.items():
        argv = [a.replace(key, value) for a in argv]
        message = message.replace(key, value)
    training = [] if {"--export", "--predict"} & set(argv) else [*TINY, "--out-dir", str(tmp_path / "run")]

    def untouched():  # what the cases share: no case may write there
        return pretrained.stat().st_mtime_ns, sorted((str(p), p.stat().st_mtime_ns) for p in bad_inputs.rglob("*"))

    before = untouched()
    with pytest.raises(SystemExit) as exit_info:
        finetune.main([*training, *argv])  # argv's flags win
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune.py: error: ") and err.count("\n") == 1 and message in err, err
    assert untouched() == before
