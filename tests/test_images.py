"""Images and folders as users keep them: one rule for which files are images (in data folders and named to
--predict), hidden files and folders, links, EXIF orientation, animated and floating-point images, special
files, and file names that are not UTF-8."""
import os
from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image

import data
import finetune
import mdra

RED, BLUE = (255, 0, 0), (0, 0, 255)


def tree(root, files):
    """Makes each file of files ({relative path: colour, bytes, or a link's target}) under root; returns root."""
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, tuple):
            Image.new("RGB", (4, 4), content).save(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.symlink_to(content)
    return root


@pytest.mark.parametrize("name, is_image", [
    ("photo.jpg", True), ("PHOTO.JPEG", True), ("anim.GIF", True), ("scan.tif", True), ("web.webp", True),
    ("pic.apng", True), ("old.pcx", True), ("notes.txt", False), ("README", False), ("labels.csv", False),
    (".DS_Store", False), ("._photo.jpg", False), (".hidden.png", False)])
def test_an_image_is_a_name_with_an_extension_pil_registers_in_any_case_that_is_not_hidden(name, is_image):
    assert data.is_image_name(name) == is_image


def test_an_ordinary_tree_lists_the_images_names_and_labels_torchvision_listed(tmp_path):
    # What checkpoints written before fingerprinted: they must still resume.
    files = {f"{c}/{sub}{name}": (9, 9, 9) for c in ("b", "a", "a b", "A") for sub in ("", "x/", "x y/", "x/z/", "Z/")
             for name in ("1.png", "a b.JPG", "Z.jpeg", "q.TIFF")}
    root = tree(tmp_path, {**files, "a/notes.txt": b"text", "b/x/data.csv": b"1,2"})
    ours, theirs = data.ImageFiles(root), torchvision.datasets.ImageFolder(root, loader=lambda path: path)
    assert len(ours) == 80 and ours.classes == theirs.classes
    assert list(zip(ours.paths, ours.targets)) == theirs.samples
    assert ours.names == [Path(path).relative_to(root).as_posix() for path, _ in theirs.samples]


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path):
    root = tree(tmp_path, {"cat/a.png": RED, "cat/.DS_Store": b"\0\0\0\1Bud1", "cat/._a.png": b"\0\5\26\7",
                           "cat/.ipynb_checkpoints/a-checkpoint.png": RED, ".ipynb_checkpoints/b.png": RED,
                           ".Trash/c.png": RED, "dog/b.png": BLUE})
    images = data.ImageFiles(root)
    assert images.classes == ["cat", "dog"] and images.names == ["cat/a.png", "dog/b.png"]
    assert finetune.image_files([root]) == [root / "cat" / "a.png", root / "dog" / "b.png"]


def test_links_are_followed_once_so_a_loop_ends_and_a_linked_file_or_folder_counts_where_it_first_comes(tmp_path):
    tree(tmp_path, {"elsewhere/d.png": RED})
    root = tree(tmp_path / "train", {"cat/a.png": RED, "cat/b.png": RED, "dog/c.png": BLUE})
    tree(root, {"cat/loop": "..", "cat/here": ".", "cat/a-link.png": "a.png", "cat/dog": "../dog",
                "dog/cat-photo.png": "../cat/b.png", "dog/more": "../../elsewhere", "dog/more2": "../../elsewhere"})
    images = data.ImageFiles(root)
    assert images.names == ["cat/a-link.png", "cat/b.png", "dog/c.png", "dog/more/d.png"]  # sorted: a-link first
    assert images.targets == [0, 0, 1, 1]
    # Named alone, cat/ reaches dog/ through its links, once.
    cat = root / "cat"
    assert finetune.image_files([cat, cat / "a.png"]) == [cat / "a-link.png", cat / "b.png", cat / "dog" / "c.png",
                                                          cat / "dog" / "more" / "d.png"]


def test_an_exif_rotated_jpeg_is_read_as_viewers_show_it(tmp_path):
    stored = Image.new("RGB", (30, 20), BLUE)
    stored.paste(RED, (0, 0, 10, 20))  # the left third, which orientation 6 (turn 90 degrees clockwise) puts on top
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    shown = np.asarray(data.open_image(tmp_path / "photo.jpg")).astype(int)
    assert shown.shape == (30, 20, 3)  # height 30, width 20
    assert (shown[:8, :, 0] > 200).all() and (shown[:8, :, 2] < 50).all()
    assert (shown[12:, :, 2] > 200).all() and (shown[12:, :, 0] < 50).all()


@pytest.mark.parametrize("pixels, file, expected", [
    (np.array([[0, 0.5], [1, 0.25]], np.float32), "unit.tif", [[0, 128], [255, 64]]),
    (np.array([[-5, 100], [300, 254.6]], np.float32), "wide.tif", [[0, 100], [255, 255]]),
    (np.array([[0, 257 * 100], [65535, 257]], np.uint16), "deep.png", [[0, 100], [255, 1]]),
], ids=["float in [0, 1]", "float beyond [0, 1]", "16-bit"])
def test_grey_images_of_deep_or_floating_point_pixels_are_scaled_from_their_range(tmp_path, pixels, file, expected):
    Image.fromarray(pixels).save(tmp_path / file)
    image = np.asarray(data.open_image(tmp_path / file))
    assert (image == np.array(expected, np.uint8)[:, :, None]).all()


def test_an_animated_gif_in_a_class_folder_is_an_image_read_as_its_first_frame(tmp_path):
    root = tree(tmp_path / "train", {"cat/a.png": RED})
    frames = [Image.new("RGB", (4, 4), colour) for colour in (BLUE, RED, RED)]
    frames[0].save(root / "cat" / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    images = data.ImageFiles(root)
    assert images.names == ["cat/a.png", "cat/anim.gif"]
    assert images[1][0].getcolors() == [(16, BLUE)]
    assert finetune.image_files([root / "cat" / "anim.gif"]) == [root / "cat" / "anim.gif"]


@pytest.mark.parametrize("name, make, why", [
    ("nan.tif", lambda path: Image.fromarray(np.array([[np.nan, np.inf]], np.float32)).save(path),
     "corrupt or not an image (ValueError: it has pixels that are NaN or infinite)"),
    ("pipe.png", os.mkfifo, "cannot be opened (it is a FIFO, not a regular file)"),
    ("zero.png", lambda path: path.symlink_to("/dev/zero"), "cannot be opened (it is a character device, not a regular file)"),
    ("gone.png", lambda path: path.symlink_to("nowhere.png"), "cannot be opened (No such file or directory)"),
    ("doc.pdf", lambda path: Image.new("RGB", (4, 4)).save(path), "corrupt or not an image (of no format PIL knows)"),
], ids=["non-finite floats", "FIFO", "device", "link to nothing", "a format PIL only writes"])
def test_a_file_in_a_data_folder_that_cannot_be_read_is_skipped_and_named_with_the_reason(tmp_path, name, make, why):
    root = tree(tmp_path, {"cat/ok.png": RED})
    make(root / "cat" / name)
    images = data.ImageFiles(root)
    assert images.names == sorted(["cat/ok.png", f"cat/{name}"])
    image, label, skipped = data.read_image(images, images.names.index(f"cat/{name}"))
    assert image.getcolors() == [(16, RED)] and skipped == [f"{root / 'cat' / name}: {why}"]


@pytest.mark.parametrize("name, make, message", [
    ("pipe.png", os.mkfifo, "is a FIFO, not an image file."),
    ("zero.png", lambda path: path.symlink_to("/dev/zero"), "is a character device, not an image file."),
    ("gone.png", lambda path: path.symlink_to("nowhere.png"), "is a link to nowhere.png, which does not exist."),
    ("missing.png", lambda path: None, "does not exist."),
    ("notes.txt", lambda path: path.write_text("hi"), "is not named as an image: .txt is not an extension of a "
     "format PIL reads (.jpg, .png, .gif, .tif, .webp and others)."),
    ("README", lambda path: path.write_text("hi"), "is not named as an image: no extension is not an extension of "
     "a format PIL reads (.jpg, .png, .gif, .tif, .webp and others)."),
    (".hidden.png", lambda path: Image.new("RGB", (4, 4)).save(path, format="PNG"), "is a hidden file (its name "
     "starts with \".\"), which is not data in a folder either; rename it to classify it."),
], ids=["FIFO", "device", "link to nothing", "missing", "not an image extension", "no extension", "hidden"])
def test_predict_of_a_file_that_is_no_image_file_is_one_sentence_and_exit_status_2(tmp_path, capsys, name, make,
                                                                                    message):
    make(tmp_path / name)
    with pytest.raises(SystemExit) as exc:  # refused before the checkpoint is even looked for
        finetune.main(["--ckpt", str(tmp_path / "none.pth"), "--predict", str(tmp_path / name)])
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"finetune.py: error: --predict {tmp_path / name} {message}\n"


def test_file_and_folder_names_that_are_not_utf8_pretrain_fine_tune_and_read_back_from_subset_txt(tmp_path, capsys):
    def name(raw):
        return os.fsdecode(raw)  # as Python gives a name in bytes that are not UTF-8: surrogate-escaped

    def shown(path):
        return str(path).encode("utf-8", "backslashreplace").decode()  # as the scripts print such a name

    root, files = tmp_path / name(b"d\xe9ta"), [name(b"%d-\xe9.png" % i) for i in range(4)]
    tree(root, {f"{split}/{c}/{file}": colour for split in ("train", "val")
                for c, colour in (("cat", RED), ("dog", BLUE)) for file in files})
    bad = root / "train" / "cat" / name(b"bad-\xff.png")
    bad.write_bytes(b"not a PNG")
    out = tmp_path / name(b"out-\xff")
    mdra.main(["--data", str(root), "--out-dir", str(out), "--epochs", "1", "--warmup-epochs", "1", "--no-compile",
               "--arch", "resnet10-w8", "--hidden-dim",
               "32", "--img-size", "8", "--batch-size", "8", "--accum-steps", "1", "--queue-size", "16", "--workers",
               "0", "--device", "cpu"])
    assert (out / "checkpoint.pth").is_file()
    skip_line = f"skipped unreadable training image {shown(bad)}: corrupt or not an image (of no format PIL knows)"
    assert skip_line in capsys.readouterr().out.splitlines()
    tune = ["--random-init", "--arch", "resnet10-w8", "--img-size", "8", "--batch-size", "4", "--workers", "0",
            "--epochs", "1", "--data", str(root), "--device", "cpu"]
    finetune.main([*tune, "--label-fraction", "0.5", "--out-dir", str(tmp_path / "half")])
    subset = (tmp_path / "half" / "subset.txt").read_bytes()
    header, *lines = subset.splitlines()  # 5 of the 9 labelled images, each as the file system's bytes name it
    assert header.decode() == finetune.SUBSET_HEADER.strip()
    assert len(lines) == 5 and all(os.path.isfile(os.fsencode(root / "train") + b"/" + line) for line in lines)
    classifier = finetune.main([*tune, "--subset-file", str(tmp_path / "half" / "subset.txt"),
                                "--out-dir", str(tmp_path / "again")])
    assert (tmp_path / "again" / "subset.txt").read_bytes() == subset
    capsys.readouterr()
    finetune.main(["--ckpt", str(classifier), "--predict", str(root / "val" / "cat")])
    printed = [line.split(": ")[0] for line in capsys.readouterr().out.splitlines()]
    assert printed == [shown(root / "val" / "cat" / file) for file in files]
