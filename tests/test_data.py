"""data.py: the named data sets and ImageFolder trees, reading images, the samplers and subsets."""
import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

import data
import mdra
import runtime


def test_data_sets_load_in_turns_rank_0_then_each_nodes_first_rank_then_the_rest(tmp_path, gloo_ranks):
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, sys, time, torch.distributed as dist, runtime\n"
        "env = runtime.setup_distributed('cpu')  # its turns wait in the gloo group of its own timeout\n"
        "assert dist.get_backend(env.control) == 'gloo'\n"
        "r = env.rank\n"
        "os.environ['LOCAL_RANK'] = str(r % 2)  # as if on two nodes: ranks 0 and 2 lead theirs\n"
        "def load():\n"
        "    start = time.monotonic(); time.sleep(0.2)\n"
        "    return start, time.monotonic()\n"
        "start, end = runtime.in_turns(load)\n"
        "open(f'{sys.argv[1]}/rank{r}', 'w').write(f'{start} {end}')\n"
        "dist.destroy_process_group()\n")
    gloo_ranks([worker, tmp_path], 3).wait()
    spans = [tuple(map(float, (tmp_path / f"rank{r}").read_text().split())) for r in range(3)]
    assert spans[0][1] <= spans[2][0]  # rank 0, then the first rank of the other node
    assert spans[2][1] <= spans[1][0]  # then the rest


def test_epoch_sampler_splits_each_global_batch_into_contiguous_rank_slices():
    one = data.EpochSampler(20, global_batch=8, num_batches=2, world_size=1, rank=0, seed=3)
    two = [data.EpochSampler(20, global_batch=8, num_batches=2, world_size=2, rank=r, seed=3) for r in range(2)]
    for s in [one, *two]:
        s.set_epoch(4)
    single = [i for _, i in one]
    r0, r1 = ([i for _, i in s] for s in two)
    assert len(single) == 16 and len(set(single)) == 16
    assert single == r0[:4] + r1[:4] + r0[4:] + r1[4:]  # same global batches, in rank order
    one.set_epoch(4, start_batch=1)
    assert [i for _, i in one] == single[8:] and len(one) == 8
    one.set_epoch(5)
    assert [i for _, i in one] != single  # a new order every epoch


def test_a_data_set_is_one_entry_of_the_table(monkeypatch):

    def load(data_dir, split, **_):
        return data.ArrayImages(np.zeros((6, 5, 7), np.uint8), [0, 1, 2] * 2, ["ant", "bee", "cow"])

    monkeypatch.setitem(data.DATA_SETS, "tiny", data.NamedData(load, 7, (0.1,) * 3, (0.2,) * 3, downloads=False))
    images, info = data.build_dataset("tiny", "data", "train")
    assert info == data.DataInfo("tiny", 3, ["ant", "bee", "cow"], 7, (0.1,) * 3, (0.2,) * 3, True)
    image, label = images[4]
    assert image.size == (7, 5) and image.mode == "RGB" and label == 1 and images.names[4] == "4"
    images, info = data.build_dataset("synthetic:64", "data", "val", img_size=12)
    assert info == data.DataInfo("synthetic:64", 10, [f"class{i}" for i in range(10)], 12, (0.5,) * 3, (0.25,) * 3, True)
    assert len(images) == len(images.targets) == len(set(images.names)) == 16  # a quarter of 64 to evaluate on
    assert len(data.build_dataset("synthetic", "data", "train")[0]) == 1024
    for wrong in ("synthetic:0", "synthetic:x", "synthetic:", f"synthetic:{10**9 + 1}"):
        with pytest.raises(runtime.UsageError, match=f"--data {wrong} must give between 1 and 1000000000 images"):
            data.build_dataset(wrong, "data", "train")
    with pytest.raises(runtime.UsageError, match="--data fashion-mnist:3 is neither a data set name"):
        data.build_dataset("fashion-mnist:3", "data", "train")
    assert data.SMALL_DATASETS == ("fashion-mnist", "cifar10", "cifar100", "stl10", "synthetic")


def test_sample_rng_draws_what_torch_manual_seed_draws_and_restores_the_global_state():
    torch.manual_seed(7)
    expected = (torch.rand(3), torch.randint(0, 1000, (3,)), torch.randperm(4))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with data.sample_rng(7):
        drawn = (torch.rand(3), torch.randint(0, 1000, (3,)), torch.randperm(4))
    assert all(torch.equal(a, b) for a, b in zip(drawn, expected))  # the views of earlier versions
    assert torch.equal(torch.get_rng_state(), before)


def test_an_unreadable_image_is_skipped_and_named_by_the_path_to_open_with_why(tmp_path, monkeypatch):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (20, 20), color=(10, 200, 30)).save(tmp_path / cls / "good.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"not an image at all")
    Image.new("RGB", (30, 30)).save(tmp_path / "a" / "big.png")  # 900 pixels, over the limit set below
    images, info = data.build_dataset(str(tmp_path), "data", "pretrain")
    assert info.num_classes == 2 and not info.small
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # PIL refuses more than twice this
    big = images.paths.index(str(tmp_path / "a" / "big.png"))  # sorted: big, broken, good
    image, label, skipped = data.read_image(images, big)
    assert image.size == (20, 20) and skipped == [
        f"{tmp_path}/a/big.png: over PIL's pixel limit of 800 pixels",
        f"{tmp_path}/a/broken.png: corrupt or not an image (of no format PIL knows)"]
    views = mdra.TwoViews(images, *map(mdra.view_transform, mdra.view_augmentations(info, 16)), seed=0)
    assert views[(0, big)][2:] == (2, "\n".join(skipped))  # what a loader worker hands on


def test_val_images_are_labelled_by_the_training_classes_even_where_val_lacks_one(tmp_path):
    for split, classes in (("train", "cat dog eel"), ("val", "cat eel")):
        for cls in classes.split():
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / cls / "0.png")
    train, info = data.build_dataset(str(tmp_path), "data", "train")
    val, val_info = data.build_dataset(str(tmp_path), "data", "val")
    assert train.targets == [0, 1, 2] and val.targets == [0, 2]  # eel is 2 in both, not 1 in val
    assert val_info.num_classes == info.num_classes == 3 and val.classes == train.classes
    (tmp_path / "val" / "dog").mkdir()  # empty: as if it were not there
    assert data.build_dataset(str(tmp_path), "data", "val")[0].targets == [0, 2]
    (tmp_path / "empty" / "val" / "cat").mkdir(parents=True)
    (tmp_path / "train").rename(tmp_path / "empty" / "train")
    with pytest.raises(runtime.UsageError, match=r"val is not an ImageFolder .*\(found no image in any class folder\)"):
        data.build_dataset(str(tmp_path / "empty"), "data", "val")
    (tmp_path / "empty" / "train").rename(tmp_path / "train")
    (tmp_path / "val" / "fox").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "fox" / "0.png")
    with pytest.raises(runtime.UsageError, match="val has 1 classes that the training images lack, e.g. fox"):
        data.build_dataset(str(tmp_path), "data", "val")
    (tmp_path / "train").rename(tmp_path / "elsewhere")  # classes and val/ side by side: val/ is not a class
    with pytest.raises(runtime.UsageError, match="has a val/ folder but no train/ folder"):
        data.build_dataset(str(tmp_path), "data", "pretrain")


def test_a_truncated_or_foreign_idx_file_is_one_sentence(tmp_path):
    header = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (4).to_bytes(4, "big")
    whole = tmp_path / "whole-idx3-ubyte"
    whole.write_bytes(header + bytes(range(24)))
    assert np.array_equal(data.read_idx(whole), np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    short = tmp_path / "short-idx3-ubyte"
    short.write_bytes(header + bytes(20))
    foreign = tmp_path / "foreign-idx3-ubyte"
    foreign.write_bytes(b"\x89PNG\r\n" + bytes(30))
    truncated = tmp_path / "truncated-idx3-ubyte.gz"
    truncated.write_bytes(gzip.compress(header + bytes(24))[:-12])
    for path, message in ((short, "is not a whole IDX file"), (foreign, "is not a whole IDX file"),
                          (truncated, "cannot be read (EOFError")):
        with pytest.raises(runtime.UsageError, match=re.escape(message)):
            data.read_idx(path)
    # Each file whole, the pair not: fewer labels than images, labels as images, a label past the last class.
    def labels_file(name, values):
        path = tmp_path / f"{name}-idx1-ubyte"
        path.write_bytes(bytes([0, 0, 8, 1]) + len(values).to_bytes(4, "big") + bytes(values))
        return path

    assert [a.tolist() for a in data.idx_pair(whole, labels_file("good", [9, 0]), 10)] == \
        [np.arange(24).reshape(2, 3, 4).tolist(), [9, 0]]
    for images, labels, shapes in ((whole, labels_file("one", [1]), "[2, 3, 4] and [1]"),
                                   (whole, whole, "[2, 3, 4] and [2, 3, 4]"),
                                   (whole, labels_file("past", [3, 10]), "[2, 3, 4] and [2]")):
        with pytest.raises(runtime.UsageError, match=re.escape(f"are not a pair of images [n, H, W] and labels [n] "
                                                               f"below 10 (their shapes: {shapes}).")):
            data.idx_pair(images, labels, 10)


def test_fashion_mnist_is_read_from_the_system_idx_files(tmp_path):
    if not Path(data.FASHION_MNIST_SYSTEM_DIR).is_dir():
        pytest.skip("the dataset-fashion-mnist package is not installed")
    images, info = data.build_dataset("fashion-mnist", str(tmp_path), "val")
    assert len(images) == 10000 and info.num_classes == 10 and info.native_size == 28
    image, label = images[0]
    assert image.size == (28, 28) and image.mode == "RGB" and label == 9  # the first test image is an ankle boot
    assert info.class_names[9] == "Ankle boot"


def gaussian_blur_reference(image, kernel_size, sigma):
    """torchvision's definition computed another way: one 2-d convolution in float64 with the outer
    product of the normalised 1-d kernels, after reflect padding."""
    def kernel1d(k):
        offsets = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, dtype=torch.float64)
        weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
        return weights / weights.sum()

    kx, ky = kernel_size
    x = torch.nn.functional.pad(image.double()[None], [kx // 2, kx // 2, ky // 2, ky // 2], mode="reflect")
    kernel = torch.outer(kernel1d(ky), kernel1d(kx))[None, None].expand(image.shape[0], 1, ky, kx)
    return torch.nn.functional.conv2d(x, kernel, groups=image.shape[0])[0]


@pytest.mark.parametrize("shape,kernel_size", [((3, 224, 224), (23, 23)), ((1, 40, 57), (5, 9))])
def test_gaussian_blur_is_torchvisions_one_axis_at_a_time(shape, kernel_size):

    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    for sigma in (0.1, 0.9, 2.0):
        blurred = data.separable_gaussian_blur(image.float(), kernel_size, sigma)
        torch.testing.assert_close(blurred.double(), gaussian_blur_reference(image, kernel_size, sigma),
                                   atol=1e-3, rtol=0)
    # As a transform on PIL images: the same random sigma as torchvision's, pixels within rounding.
    pil = TF.to_pil_image(image[0] if shape[0] == 1 else image)
    ours, theirs = data.GaussianBlur(kernel_size, (0.1, 2.0)), T.GaussianBlur(kernel_size, (0.1, 2.0))
    for seed in range(5):
        torch.manual_seed(seed)
        a = TF.pil_to_tensor(ours(pil)).int()
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        b = TF.pil_to_tensor(theirs(pil)).int()
        assert torch.equal(torch.rand(1), after_ours)  # the same draws from the global generator
        assert isinstance(ours(pil), Image.Image) and ours(pil).mode == pil.mode
        assert (a - b).abs().max() <= 1 and (a != b).float().mean() < 1e-3


def test_16_bit_grey_images_are_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    (tmp_path / "scans").mkdir()
    grey16 = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "scans" / "16-bit.png")
    Image.fromarray((grey16 // 257).astype(np.uint8)).save(tmp_path / "scans" / "8-bit.png")
    images = data.ImageFiles(tmp_path)
    sixteen, eight = (np.asarray(images[images.names.index(f"scans/{name}.png")][0]) for name in ("16-bit", "8-bit"))
    assert sixteen.tolist() == eight.tolist() == [[[0] * 3, [64] * 3, [128] * 3, [255] * 3]]

