"""eval_knn.py: votes against a float64 loop, memory budgets, torchrun shards, baselines, refusals, the monitor."""
import argparse
import contextlib
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import time
import traceback
import types
from pathlib import Path

import pytest
import torch

import data
import eval_knn
import knn
import mdra
import runtime

# The smallest network that proves what these tests prove: 8 channels after the stem, 64 features.
ARCH, FEATURES = "resnet10-w8", 8 * 8
# Two epochs, so that a monitor after epoch 1 could still disturb epoch 2.
PRETRAIN = ["--no-compile", "--warmup-epochs", "1", "--data", "synthetic:24", "--img-size", "8", "--arch", ARCH, "--hidden-dim", "32",
            "--batch-size", "16", "--queue-size", "16", "--epochs", "2", "--workers", "0"]


@contextlib.contextmanager
def one_thread():
    """On a small machine shared with other test runs, OpenMP threads spin-waiting for each other make
    every small operation many times slower; one thread per process avoids that."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def one_thread_here():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """Two tiny pretraining runs of mdra.py, one plain, one with the kNN monitor after each epoch.
    Returns their output directories. In this process: a new one would spend seconds importing torch."""
    plain, monitored = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("monitored")
    with one_thread():  # session fixtures are set up before the module's
        mdra.main(PRETRAIN + ["--out-dir", str(plain)])
        mdra.main(PRETRAIN + ["--out-dir", str(monitored), "--knn-every", "1"])
    return plain, monitored


@pytest.fixture(scope="session")
def checkpoint(pretrained):
    return pretrained[0] / "checkpoint.pth"


def reference_votes(train, labels, test, num_classes, k, temperature):
    """The weighted kNN written out with plain loops in float64."""
    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    bank = [unit(v) for v in train.tolist()]
    votes = []
    for query in test.tolist():
        query = unit(query)
        similarities = sorted(((sum(a * b for a, b in zip(query, v)), j) for j, v in enumerate(bank)), reverse=True)
        row = [0.0] * num_classes
        for s, j in similarities[:k]:
            row[int(labels[j])] += math.exp(s / temperature)
        votes.append(row)
    return torch.tensor(votes, dtype=torch.float64)


def random_problem(n_train=97, n_test=23, dim=8, num_classes=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n_train, dim, generator=g, dtype=dtype)
    test = torch.randn(n_test, dim, generator=g, dtype=dtype)
    labels = torch.randint(0, num_classes - 1, (n_train,), generator=g)  # the last class gets no train image
    return train, labels, test, num_classes


@pytest.mark.parametrize("chunk_mb", [1e-5, 3e-4, 1024])  # 1-row bank pieces ... everything in one block
def test_votes_for_several_k_match_a_float64_reference_loop(chunk_mb):
    train, labels, test, num_classes = random_problem()
    ks = [1, 5, 20, 97]
    votes = knn.weighted_knn_votes(train, labels, test, num_classes, ks, temperature=0.07, chunk_mb=chunk_mb)
    assert sorted(votes) == ks
    for k in ks:
        assert votes[k].shape == (23, num_classes) and votes[k].dtype == torch.float64
        torch.testing.assert_close(votes[k], reference_votes(train, labels, test, num_classes, k, 0.07),
                                   rtol=1e-12, atol=0)


def test_weighted_knn_normalises_features_itself_and_is_the_one_k_case():
    train, labels, test, num_classes = random_problem()
    g = torch.Generator().manual_seed(1)
    scaled_train = train * torch.rand(len(train), 1, generator=g, dtype=torch.float64).add(0.1) * 10
    scores = eval_knn.weighted_knn(scaled_train, labels, test * 3, num_classes, k=20, temperature=0.1)
    torch.testing.assert_close(scores, reference_votes(train, labels, test, num_classes, 20, 0.1), rtol=1e-12, atol=0)
    assert eval_knn.weighted_knn(train.float(), labels, test.float(), num_classes).dtype == torch.float32


def test_float32_votes_are_the_same_for_any_memory_budget():
    train, labels, test, num_classes = random_problem(n_train=300, n_test=70, dim=16, dtype=torch.float32)
    ks = [1, 10, 50]
    one_block = knn.weighted_knn_votes(train, labels, test, num_classes, ks, chunk_mb=1024)
    for chunk_mb in (1e-5, 1e-3, 0.01):  # from 1-row pieces to a few pieces of 16 x 160 blocks
        votes = knn.weighted_knn_votes(train, labels, test, num_classes, ks, chunk_mb=chunk_mb)
        for k in ks:
            # Block shapes change only the float rounding of the similarities, never the neighbours.
            torch.testing.assert_close(votes[k], one_block[k], rtol=1e-5, atol=0)
            assert knn.count_correct(votes[k], labels[:70]) == knn.count_correct(one_block[k], labels[:70])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_down_to_the_lowest_temperature_every_weight_is_finite_and_nonzero_and_below_it_none_is_computed(dtype):
    # Neighbours at similarity 1 (the largest weight, k of them summed) and -1 (the smallest).
    train = torch.tensor([[1.0, 0.0]] * 10 + [[-1.0, 0.0]] * 10, dtype=dtype)
    labels, test = torch.arange(20) % 2 + 2 * (torch.arange(20) >= 10), torch.tensor([[1.0, 0.0]], dtype=dtype)
    lowest = knn.lowest_temperature(20, dtype)
    votes = knn.weighted_knn_votes(train, labels, test, 4, [20], temperature=lowest)[20][0]
    assert torch.isfinite(votes).all() and (votes > 0).all()  # all four classes voted for
    reference = torch.tensor([5 * math.exp(s / lowest) for s in (1, 1, -1, -1)], dtype=torch.float64)
    torch.testing.assert_close(votes.double(), reference, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    with pytest.raises(ValueError, match=f"temperature {lowest * 0.99:g} is below"):
        knn.weighted_knn_votes(train, labels, test, 4, [20], temperature=lowest * 0.99)


def test_bank_images_tied_at_the_kth_place_vote_in_bank_order_whatever_the_memory_budget():
    # 40 copies of one image (duplicates), with varied labels, are every query's nearest: which k of them vote
    # is decided by their order in the bank, not by how the bank is cut. (2-d features: every dot product is
    # the same two-term sum, so the copies tie exactly in every block shape.)
    g = torch.Generator().manual_seed(0)
    train = torch.randn(300, 2, generator=g)
    labels = torch.randint(0, 10, (300,), generator=g)
    copies = torch.randperm(300, generator=g)[:40].sort().values
    train[copies] = torch.tensor([3.0, 4.0])
    test = torch.tensor([[3.0, 4.0], [0.6, 0.8]])
    for k in (1, 7, 20):
        expected = torch.bincount(labels[copies[:k]], minlength=10)
        one_block = knn.weighted_knn_votes(train, labels, test, 10, [k], chunk_mb=1024)[k]
        neighbours = one_block / math.exp(1 / 0.07)  # each neighbour's weight is exp(1 / T)
        assert torch.equal(neighbours.round().long(), expected.expand(2, 10)), k
        for chunk_mb in (1e-5, 3e-4, 1e-3):
            assert torch.equal(knn.weighted_knn_votes(train, labels, test, 10, [k], chunk_mb=chunk_mb)[k], one_block)


def test_fewer_queries_than_one_chunk_and_no_queries_at_all():
    train, labels, test, num_classes = random_problem(n_test=3)
    votes = knn.weighted_knn_votes(train, labels, test, num_classes, [5, 20], chunk_mb=1024)
    reference = reference_votes(train, labels, test, num_classes, 20, 0.07)
    torch.testing.assert_close(votes[20], reference, rtol=1e-12, atol=0)
    empty = knn.weighted_knn_votes(train, labels, test[:0], num_classes, [5, 20])
    assert empty[20].shape == (0, num_classes)


def test_k_larger_than_the_bank_is_refused():
    train, labels, test, num_classes = random_problem(n_train=10)
    with pytest.raises(ValueError, match="between 1 and the 10 train images"):
        eval_knn.weighted_knn(train, labels, test, num_classes, k=11)


def test_top5_credits_only_a_class_that_got_votes_and_a_tie_by_its_chance_to_win_it():
    scores = torch.tensor([[3.0, 0, 0, 0, 0, 0, 0, 0],    # class 6 got no vote: wrong at top-1 and top-5
                           [3.0, 0, 0, 0, 0, 0, 0, 0],    # class 0 won
                           [1.0, 2.0, 2.0, 0, 0, 0, 0, 0],  # class 2 tied with the winner: half a hit at top-1
                           [5.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0, 0]])  # class 5 is sixth
    labels = torch.tensor([6, 0, 2, 5])
    assert knn.count_correct(scores, labels) == {1: 1.5, 5: 2.0}


def test_tied_votes_count_as_the_average_over_every_order_of_the_tied_classes():
    import itertools
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (40, 5), generator=g).double()  # many ties, some classes without votes
    labels = torch.randint(0, 5, (40,), generator=g)
    counts = knn.count_correct(scores, labels, topk=(1, 2, 3))
    for k in (1, 2, 3):  # reference: rank by score, ties in each of the 5! orders of the classes equally often
        hits = 0
        for order in itertools.permutations(range(5)):
            for row, label in zip(scores.tolist(), labels.tolist()):
                ranked = sorted(range(5), key=lambda c: (-row[c], order.index(c)))
                hits += label in ranked[:k] and row[label] > 0
        assert counts[k] == pytest.approx(hits / 120, rel=1e-12)
    collapsed = torch.ones(10, 10)  # every class voted for equally: the chance level, not a win for each
    assert knn.count_correct(collapsed, torch.arange(10)) == {1: pytest.approx(1.0), 5: pytest.approx(5.0)}


def run_as_rank(argv, rank, world_size, port):
    """eval_knn.main(argv) as one rank of a gloo group, with the environment torchrun gives a rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    eval_knn.main(argv)


@contextlib.contextmanager
def forked_ranks(argv, processes, timeout=120):
    """eval_knn.main(argv) as `processes` gloo ranks, each a fork of this process: a fresh interpreter per
    rank would spend seconds importing torch. (os.fork, not multiprocessing: run_main kills the children
    multiprocessing knows of, as loader workers.) The body runs meanwhile; then every rank must end with
    status 0. Their output and tracebacks go to this test's captured output."""
    with socket.socket() as s:  # a free port for rank 0's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pids = []
    for rank in range(processes):
        pid = os.fork()
        if pid == 0:  # the rank, which must never return into pytest
            # Loader workers this process may have are not the rank's to kill (as multiprocessing's own children).
            multiprocessing.process._children.clear()
            status = 1
            try:
                run_as_rank(argv, rank, processes, port)
                status = 0
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        pids.append(pid)
    statuses = {}
    try:
        yield
        deadline = time.monotonic() + timeout
        # Until all have ended, or one has failed: the others would wait for it in a collective.
        while len(statuses) < processes and time.monotonic() < deadline and not any(statuses.values()):
            for pid in set(pids) - set(statuses):
                ended, status = os.waitpid(pid, os.WNOHANG)
                if ended:
                    statuses[pid] = os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
    finally:
        for pid in set(pids) - set(statuses):
            why = "killed after another rank failed" if any(statuses.values()) else "killed at the time limit"
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            statuses[pid] = why
    assert [statuses[pid] for pid in pids] == [0] * processes


def test_two_gloo_ranks_give_exactly_the_single_process_result(checkpoint, tmp_path):
    # 45 train and 11 val images: both split unevenly over 2 ranks (23 + 22, 6 + 5).
    common = ["--ckpt", str(checkpoint), "--data", "synthetic:45", "--k", "1", "5", "20", "--workers", "0"]
    with forked_ranks([*common, "--save-features", str(tmp_path / "two"), "--out", str(tmp_path / "two.json")], 2):
        eval_knn.main(common + ["--save-features", str(tmp_path / "one"), "--out", str(tmp_path / "one.json")])
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    assert two["world_size"] == 2 and (two["n_train"], two["n_test"]) == (45, 11)
    assert two["results"] == one["results"]
    for split, rows in (("train", 45), ("val", 11)):
        single, gathered = (torch.load(tmp_path / run / f"{split}.pth", weights_only=True) for run in ("one", "two"))
        assert gathered["features"].shape == single["features"].shape == (rows, FEATURES)  # no padded duplicates
        assert torch.equal(gathered["labels"], single["labels"])
        # Rank order reproduces image order; batches of other sizes may only round differently.
        torch.testing.assert_close(gathered["features"], single["features"], rtol=1e-5, atol=1e-6)


def test_baselines_run_end_to_end_and_saved_features_give_the_same_result(checkpoint, tmp_path):
    common = ["--ckpt", str(checkpoint), "--k", "5", "20", "--workers", "0"]
    pixels = eval_knn.main(common + ["--pixels", "--save-features", str(tmp_path / "pixels"),
                                     "--out", str(tmp_path / "pixels.json")])
    saved = torch.load(tmp_path / "pixels" / "train.pth", weights_only=True)
    assert saved["features"].shape == (24, 3 * 8 * 8) and saved["num_classes"] == 10
    # Synthetic classes are distinct colour patterns, so raw pixels must beat chance (10 %) by far.
    assert pixels[20][0] > 50
    assert eval_knn.main(["--load-features", str(tmp_path / "pixels"), "--k", "5", "20",
                          "--out", str(tmp_path / "reloaded.json")]) == pixels
    random_init = eval_knn.main(common + ["--random-init", "--out", str(tmp_path / "random.json")])
    record = json.loads((tmp_path / "random.json").read_text())
    assert record["features"].startswith(f"{ARCH}, random init") and set(record["results"]) == {"5", "20"}
    assert set(random_init) == {5, 20}


def test_loaded_features_refuse_flags_that_would_mislabel_them_and_files_of_two_runs(checkpoint, tmp_path, capsys):
    common = ["--ckpt", str(checkpoint), "--k", "5", "--workers", "0"]
    eval_knn.main(common + ["--pixels", "--save-features", str(tmp_path / "pixels"), "--out", str(tmp_path / "p.json")])
    eval_knn.main(common + ["--save-features", str(tmp_path / "trained"), "--out", str(tmp_path / "t.json")])
    for flags in (["--ckpt", str(checkpoint)], ["--pixels"], ["--data", "synthetic"], ["--knn-subset", "5"],
                  ["--holdout", "5"]):
        with pytest.raises(SystemExit) as exit_info:
            eval_knn.main(["--load-features", str(tmp_path / "pixels"), *flags])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"--load-features takes the features from its folder; {flags[0]}" in err
    (tmp_path / "mixed").mkdir()
    shutil.copy(tmp_path / "pixels" / "train.pth", tmp_path / "mixed")
    shutil.copy(tmp_path / "trained" / "val.pth", tmp_path / "mixed")
    with pytest.raises(SystemExit):
        eval_knn.main(["--load-features", str(tmp_path / "mixed"), "--k", "5"])
    assert "train.pth and val.pth come from different features" in capsys.readouterr().err


def test_holdout_queries_the_training_images_that_the_bank_leaves_out(tmp_path):
    # Settings are chosen without the test split: --holdout N queries the N training images that finetune.py
    # --holdout N holds out of all labels, against a bank of the others (of which --knn-subset draws).
    common = ["--data", "synthetic:40", "--img-size", "8", "--pixels", "--k", "1", "5",
              "--workers", "0"]
    eval_knn.main(common + ["--save-features", str(tmp_path / "all"), "--out", str(tmp_path / "all.json")])
    held = eval_knn.main(common + ["--holdout", "12", "--save-features", str(tmp_path / "held"),
                                   "--out", str(tmp_path / "held.json")])
    whole = torch.load(tmp_path / "all" / "train.pth", weights_only=True)
    held_out = data.held_out_subset(whole["labels"], [], 12, seed=0)
    rest = sorted(set(range(40)) - set(held_out))
    bank, queries = (torch.load(tmp_path / "held" / f"{split}.pth", weights_only=True) for split in ("train", "val"))
    for part, indices in ((queries, held_out), (bank, rest)):
        assert torch.equal(part["features"], whole["features"][indices])
        assert torch.equal(part["labels"], whole["labels"][indices])
    for k in (1, 5):  # the vote of a bank without the queries in it
        scores = eval_knn.weighted_knn(bank["features"], bank["labels"], queries["features"], 10, k=k)
        assert held[k][0] == pytest.approx(100 * knn.count_correct(scores, queries["labels"])[1] / 12)
    record = json.loads((tmp_path / "held.json").read_text())
    assert (record["eval"], record["n_train"], record["n_test"]) == ("held-out", 28, 12)
    assert record["features"].endswith(", queries 12 train images held out of the bank (seed 0)")
    assert json.loads((tmp_path / "all.json").read_text())["eval"] == "val"

    eval_knn.main(common + ["--holdout", "12", "--knn-subset", "10", "--save-features", str(tmp_path / "part"),
                            "--out", str(tmp_path / "part.json")])
    chosen = torch.tensor(rest)[torch.randperm(28, generator=torch.Generator().manual_seed(0))[:10].sort().values]
    assert torch.equal(torch.load(tmp_path / "part" / "train.pth", weights_only=True)["features"],
                       whole["features"][chosen])
    # By default beside the checkpoint, apart from the result on the test split.
    args = argparse.Namespace(ckpt="run/checkpoint.pth", random_init=False, pixels=False, holdout=12)
    assert eval_knn.default_out(args) == Path("run/knn_held-out.json")
    pixels = argparse.Namespace(**{**vars(args), "pixels": True})
    assert eval_knn.default_out(pixels) == Path("run/knn_pixels_held-out.json")


@pytest.mark.parametrize("workers", ["0", "2"])
def test_an_unreadable_image_is_named_in_one_sentence(tmp_path, capsys, workers):
    from PIL import Image
    images = tmp_path / "images"
    for split, count in (("train", 8), ("val", 4)):
        for i in range(count):
            (images / split / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(images / split / f"class{i % 2}" / f"{i}.png")
    (images / "train" / "class0" / "2.png").write_bytes(b"half a PNG")
    with pytest.raises(SystemExit) as exit_info:
        eval_knn.main(["--pixels", "--data", str(images), "--img-size", "8", "--k", "1", "--workers", workers,
                       "--out", str(tmp_path / "knn.json")])
    assert exit_info.value.code == 2 and capsys.readouterr().err == (
        f"eval_knn.py: error: cannot read {images}/train/class0/2.png: corrupt or not an image (of no format PIL "
        "knows); an evaluation needs every image: remove or replace it.\n")


def test_knn_subset_draws_the_bank_as_the_monitor_does_and_keeps_its_labels(tmp_path):
    common = ["--data", "synthetic:24", "--img-size", "8", "--pixels", "--k", "3",
              "--workers", "0"]
    eval_knn.main(common + ["--save-features", str(tmp_path / "all"), "--out", str(tmp_path / "all.json")])
    eval_knn.main(common + ["--knn-subset", "10", "--seed", "3", "--save-features", str(tmp_path / "part"),
                            "--out", str(tmp_path / "part.json")])
    whole, part = (torch.load(tmp_path / name / "train.pth", weights_only=True) for name in ("all", "part"))
    chosen = torch.randperm(24, generator=torch.Generator().manual_seed(3))[:10].sort().values  # the monitor's draw
    assert torch.equal(part["features"], whole["features"][chosen])
    assert torch.equal(part["labels"], whole["labels"][chosen])
    record = json.loads((tmp_path / "part.json").read_text())
    assert record["n_train"] == 10 and record["knn_subset"] == 10
    assert record["features"].endswith(", bank of 10 of the 24 train images (seed 3)")


def test_the_progress_lines_give_an_eta_that_counts_the_val_images_still_to_come(tmp_path, monkeypatch, capsys):
    clock = itertools.count()
    monkeypatch.setattr(knn, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))  # 1 s a reading
    eval_knn.main(["--data", "synthetic:48", "--img-size", "8", "--pixels", "--k", "3",
                   "--workers", "0", "--batch-size", "4", "--out", str(tmp_path / "knn.json")])  # 12 val images
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("train:", "val:"))]
    assert lines == ([f"train: {4 * k}/48 images of rank 0 in {k} s, eta 0:00:{15 - k:02d} "
                      "(with 12 more images to come)" for k in range(1, 13)]
                     + [f"val: {4 * k}/12 images of rank 0 in {k} s, eta 0:00:{3 - k:02d}" for k in range(1, 4)])


def test_a_folder_of_one_class_is_refused_as_every_vote_in_it_would_be_right(tmp_path, capsys):
    from PIL import Image
    images = tmp_path / "images"
    for split in ("train", "val"):
        (images / split / "all").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(images / split / "all" / "0.png")
    with pytest.raises(SystemExit) as exit_info:
        eval_knn.main(["--pixels", "--data", str(images), "--img-size", "8", "--k", "1", "--workers", "0",
                       "--out", str(tmp_path / "knn.json")])
    assert exit_info.value.code == 2 and capsys.readouterr().err == (
        f"eval_knn.py: error: a kNN evaluation needs at least two classes; {images} has 1, over which every "
        "answer is right.\n")


def test_a_crop_the_checkpoints_imagenet_stem_would_shrink_to_padding_is_refused():
    args = argparse.Namespace(pixels=False, random_init=False, ckpt="imagenet.pth", arch=None, img_size=16, seed=0)
    ckpt = {"arch": "resnet18", "small_stem": False, "backbone": {}}
    with pytest.raises(runtime.UsageError, match="--img-size 16 is below 32, the smallest crop the ImageNet stem's"):
        eval_knn.feature_network(args, ckpt, info=None)


def test_knn_json_goes_next_to_the_checkpoint_by_default(checkpoint):
    eval_knn.main(["--ckpt", str(checkpoint), "--pixels", "--k", "20", "--workers", "0"])
    assert json.loads((checkpoint.parent / "knn_pixels.json").read_text())["n_train"] == 24


@pytest.mark.parametrize("output", ["beside --ckpt", "--out", "--save-features"])
def test_an_output_folder_that_cannot_be_written_is_one_sentence_before_any_work(
        output, tmp_path, make_read_only, monkeypatch, capsys):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    (read_only / "checkpoint.pth").write_bytes(b"")  # refused before it is read
    make_read_only(read_only)
    monkeypatch.setattr(data, "build_dataset", lambda *args: pytest.fail("the data was listed first"))
    monkeypatch.setattr(runtime, "load_checkpoint", lambda *args, **kwargs: pytest.fail("the checkpoint was read first"))
    flags, subject = {
        "beside --ckpt": (["--ckpt", str(read_only / "checkpoint.pth")],
                          f"the default --out's folder {read_only} is not writable"),
        "--out": (["--pixels", "--out", str(read_only / "knn.json")], f"--out's folder {read_only} is not writable"),
        "--save-features": (["--pixels", "--out", str(tmp_path / "knn.json"), "--save-features", str(read_only / "f")],
                            f"--save-features {read_only / 'f'} cannot be created")}[output]
    with pytest.raises(SystemExit) as exit_info:
        eval_knn.main([*flags, "--k", "5", "--workers", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"eval_knn.py: error: {re.escape(subject)} \([A-Z][\w -]+\)\.\n", err), err


@pytest.mark.parametrize("problem", ["garbage", "wrong format", "arch mismatch", "run folder", "empty folder"])
def test_bad_checkpoints_are_refused_with_one_sentence(problem, checkpoint, tmp_path, capsys):
    path, extra = tmp_path / "bad.pth", []
    if problem == "garbage":
        path.write_bytes(b"this is not a checkpoint")
    elif problem == "wrong format":
        torch.save({"format": "dino", "backbone": {}}, path)
    elif problem == "run folder":  # the pretraining's --out-dir, which holds the checkpoint
        path = checkpoint.parent
    elif problem == "empty folder":
        path = tmp_path
    else:
        path, extra = checkpoint, ["--arch", "resnet10-w16"]  # as narrow a network, of another width
    with pytest.raises(SystemExit) as exit_info:
        eval_knn.main(["--ckpt", str(path), *extra, "--k", "20", "--workers", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eval_knn.py: error: ") and "\n" not in err and "Traceback" not in err
    assert {"garbage": "not a readable checkpoint", "wrong format": "format 'dino'",
            "arch mismatch": "--arch resnet10-w16 does not match",
            "run folder": f"checkpoint {path} is a folder; give the checkpoint file in it, {checkpoint}.",
            "empty folder": f"checkpoint {path} is a folder, not a checkpoint file."}[problem] in err


@pytest.mark.parametrize("option, message", [(["--batch-size", "0"], "--batch-size must be at least 1."),
                                             (["--workers", "-1"], "--workers must be at least 0."),
                                             (["--k", "0"], "every --k at least 1."),
                                             (["--temperature", "0.01"], "--temperature 0.01 is below 0.012"),
                                             (["--data", "synthetic:0"], "--data synthetic:0 must give between 1 and "),
                                             (["--holdout", "-1"], "--holdout must be at least 0."),
                                             (["--holdout", "25"], "--holdout 25 must be between 1 and the 24 training "
                                                                   "images it can hold out."),
                                             (["--out", "/"], "--out / is a folder; give a file name, e.g. /knn.json."),
                                             (["--save-features", sys.executable],
                                              f"--save-features {sys.executable} is a file, not a folder.")])
def test_bad_options_are_refused_with_one_sentence(option, message, checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_knn.main(["--ckpt", str(checkpoint), "--pixels", *option])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("eval_knn.py: error: ") and message in err and "\n" not in err


def test_out_replaces_an_earlier_result_but_never_another_kind_of_file(checkpoint, tmp_path, capsys):
    before = checkpoint.read_bytes()
    with pytest.raises(SystemExit) as exit_info:  # the checkpoint itself, named by mistake
        eval_knn.main(["--ckpt", str(checkpoint), "--out", str(checkpoint), "--k", "5", "--workers", "0"])
    assert exit_info.value.code == 2 and capsys.readouterr().err == (
        f"eval_knn.py: error: --out {checkpoint} is also what this run reads; it is not written over: give another "
        "path.\n")
    assert checkpoint.read_bytes() == before
    earlier = tmp_path / "knn.json"
    earlier.write_text(' {"features": "an earlier run\'s", "results": {"20": {"top1": 1.0, "top5": 2.0}}}\n')
    eval_knn.main(["--pixels", "--data", "synthetic:32", "--img-size", "8", "--k", "5",
                   "--workers", "0", "--out", str(earlier)])
    assert set(json.loads(earlier.read_text())["results"]) == {"5"}


def test_monitor_restores_modes_and_touches_neither_weights_nor_global_rng():
    args = argparse.Namespace(data="synthetic:40", data_dir="data", img_size=8, knn_subset=25,
                              batch_size=16, workers=0, amp="off", channels_last=False, seed=0)
    env = runtime.DistEnv(0, 1, 0, torch.device("cpu"))
    backbone, _ = mdra.build_backbone(ARCH, small_stem=True)
    backbone.train()
    backbone.layer2.eval()  # a mixed state must come back as it was, not as train() everywhere
    modes = [m.training for m in backbone.modules()]
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    rng = torch.get_rng_state()
    result = knn.monitor(backbone, args, env)
    assert set(result) == {"top1@20", "top5@20"} and all(0 <= v <= 100 for v in result.values())
    assert [m.training for m in backbone.modules()] == modes
    assert all(torch.equal(v, state[k]) for k, v in backbone.state_dict().items())  # BatchNorm statistics too
    assert torch.equal(torch.get_rng_state(), rng)


def test_monitor_labels_its_bank_subset_with_the_subsets_own_labels():
    args = argparse.Namespace(data="synthetic:80", data_dir="data", img_size=8, knn_subset=50,
                              batch_size=16, workers=0, amp="off", channels_last=False, seed=0)
    pixels = torch.nn.Flatten()  # the synthetic classes are far apart in pixel space
    result = knn.monitor(pixels, args, runtime.DistEnv(0, 1, 0, torch.device("cpu")))
    assert result["top1@20"] >= 80  # chance is 10%; labels of other images than the subset's fall to it


def test_knn_accuracy_gives_each_ks_top1_and_top5_as_ranking_the_reference_votes_does():
    train, labels, test, num_classes = random_problem(n_test=40)
    test_labels = torch.randint(0, num_classes, (40,), generator=torch.Generator().manual_seed(1))
    env = runtime.DistEnv(0, 1, 0, torch.device("cpu"))
    result = knn.knn_accuracy(train, labels, test, test_labels, num_classes, [5, 20], 0.07, 1024, env)
    for k in (5, 20):
        votes = reference_votes(train, labels, test, num_classes, k, 0.07)
        ranked = votes.argsort(dim=1, descending=True)
        voted = votes.gather(1, test_labels[:, None])[:, 0] > 0  # a class no neighbour voted for is never a hit
        top1 = 100 * ((ranked[:, 0] == test_labels) & voted).double().mean().item()
        top5 = 100 * ((ranked[:, :5] == test_labels[:, None]).any(dim=1) & voted).double().mean().item()
        assert result[k] == pytest.approx((top1, top5), abs=1e-9)
    assert all(top1 < top5 for top1, top5 in result.values())


def test_monitor_with_a_bank_smaller_than_k_votes_with_the_whole_bank():
    args = argparse.Namespace(data="synthetic:40", data_dir="data", img_size=8, knn_subset=5,
                              batch_size=16, workers=0, amp="off", channels_last=False, seed=0)
    backbone, _ = mdra.build_backbone(ARCH, small_stem=True)
    result = knn.monitor(backbone, args, runtime.DistEnv(0, 1, 0, torch.device("cpu")))
    assert set(result) == {"top1@5", "top5@5"}


def test_monitor_in_training_is_logged_and_leaves_the_weights_bit_identical(pretrained):
    plain, monitored = pretrained
    def epoch_records(run):
        return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r.get("event") == "epoch"]

    knn = [r["knn"] for r in epoch_records(monitored)]
    assert len(knn) == 2 and all(set(r) == {"top1@20", "top5@20"} for r in knn)
    assert not any("knn" in r for r in epoch_records(plain))
    with_monitor, without = (torch.load(run / "checkpoint.pth", weights_only=True) for run in (monitored, plain))
    for part in ("online", "offline"):
        assert all(torch.equal(with_monitor[part][k], without[part][k]) for k in without[part])
    assert torch.equal(with_monitor["queue"], without["queue"])
    assert torch.equal(with_monitor["rng"]["torch"], without["rng"]["torch"])
