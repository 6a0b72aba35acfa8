"""The images every script reads: the named data sets and ImageFolder trees, reading an image file as a
viewer shows it, the per-sample seeds of the augmentations, the subsets drawn per class, and the
evaluation's centre crops. mdra.py, eval_knn.py and finetune.py import it; it imports runtime.py only.
"""
import contextlib
import errno
import functools
import gzip
import math
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T
from torchvision.transforms import functional as TF
from torchvision.datasets.folder import IMG_EXTENSIONS

import runtime
from runtime import UsageError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
SYNTHETIC_CLASSES = 10
SYNTHETIC_VAL_SEEDS = 10**9  # the first seed of synthetic evaluation images (load_synthetic)
TRAIN_SPLITS = ("pretrain", "train")  # the splits of training images; the other one is "val"


@dataclass
class DataInfo:
    name: str
    num_classes: int
    class_names: list
    native_size: int   # the image size the data comes in (224 for an ImageFolder)
    mean: tuple
    std: tuple
    small: bool        # a small-image data set: small stem and the small-data preset


# ------------------------------------------------------------------------------------------------
# Reading an image file
# ------------------------------------------------------------------------------------------------

READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on a bad file
NAMED_SKIPS = 5  # unreadable training images named in the log per run; any further ones are only counted


FILE_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
              stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


@functools.cache
def image_extensions():
    """The extensions of image files, lower-case: every one PIL registers, and those torchvision's ImageFolder
    took (which PIL may lack a decoder for: refused when read, as before, rather than dropped)."""
    return frozenset(Image.registered_extensions()) | frozenset(IMG_EXTENSIONS)


def is_image_name(name):
    """The one rule for which files are images, in data folders and named on a command line alike: a name with
    an extension of image_extensions (any case) and not hidden: a name that starts with "." is not data
    (.DS_Store, macOS's ._photo.jpg, .ipynb_checkpoints)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in image_extensions()


def special_file(path):
    """What path is, links followed, if not a regular file ("a FIFO", "a character device", ...), else None.
    Raises OSError where it cannot be looked at (missing, a link to nothing)."""
    kind = stat.S_IFMT(os.stat(path).st_mode)
    return None if kind == stat.S_IFREG else FILE_KINDS.get(kind, "a special file")


def unlistable(error):
    raise UsageError(f"{error.filename} cannot be listed ({error.strerror}).")


def image_paths(folder, taken):
    """The image files (is_image_name) under folder, links followed, in the order of torchvision's ImageFolder
    (by folder path, then by name). taken: the real paths of the folders and files already taken, which this
    adds to. A hidden folder is not entered, nor one taken (a link loop, a second link to a folder), and a file
    taken is not taken again: a file and a link to it, or two links, count once, where they first come."""
    groups = []
    for top, folders, files in os.walk(folder, onerror=unlistable, followlinks=True):
        real_top = os.path.realpath(top)
        taken.add(real_top)
        kept = [name for name in sorted(folders) if not name.startswith(".")
                and os.path.realpath(os.path.join(top, name)) not in taken]
        taken.update(os.path.realpath(os.path.join(top, name)) for name in kept)
        folders[:] = kept
        groups.append((top, real_top, sorted(name for name in files if is_image_name(name))))
    paths = []
    for top, real_top, files in sorted(groups):
        for name in files:
            path = os.path.join(top, name)
            real = os.path.realpath(path) if os.path.islink(path) else os.path.join(real_top, name)  # an lstat only
            if real not in taken:
                taken.add(real)
                paths.append(path)
    return paths


def rgb(image):
    """Any PIL image as RGB, as a viewer shows it: turned as its EXIF orientation says, and its first frame if
    animated (where PIL opens it). Greys that convert("RGB") would clip to white or black are scaled to 8 bits
    first: 16- and 32-bit integers (mode I;16, I) as if 65535 were white; floats (mode F, as a float32 TIFF)
    from their range: values all in [0, 1] times 255, others as they are, clipped to 0-255. A float image
    with NaN or infinite pixels, which show no grey, raises ValueError."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        if not np.isfinite(pixels).all():
            raise ValueError("it has pixels that are NaN or infinite")
        unit = image.mode == "F" and 0 <= pixels.min(initial=0) and pixels.max(initial=0) <= 1
        pixels = pixels * (255 if unit else 1 if image.mode == "F" else 1 / 257)
        image = Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8))
    return image.convert("RGB")


def regular_file(path):
    """path, once known to be a regular file (links followed): a FIFO or a device, on which reading would wait
    or never end, raises OSError saying what it is, as a file that cannot be opened does."""
    if kind := special_file(path):
        raise OSError(errno.EINVAL, f"it is {kind}, not a regular file")
    return path


def open_image(path):
    """The image file at path as rgb gives it."""
    with Image.open(regular_file(path)) as image:
        return rgb(image)


def image_path(images, index):
    """Where images[index] is, for a message: an ImageFolder file's path as the user can open it (under
    --data, as given), else the image's name (an index), through Subset wrappers."""
    while isinstance(images, torch.utils.data.Subset):
        images, index = images.dataset, images.indices[index]
    return images.paths[index] if hasattr(images, "paths") else images.names[index]


def read_error(error):
    """Why a file could not be read, in a few words, from what reading it raised (one of READ_ERRORS)."""
    if isinstance(error, Image.DecompressionBombError):
        return f"over PIL's pixel limit of {2 * Image.MAX_IMAGE_PIXELS} pixels"
    if isinstance(error, OSError) and error.errno is not None:  # from the file system, not from PIL
        return f"cannot be opened ({error.strerror})"
    if isinstance(error, UnidentifiedImageError):  # its message shows only a file object
        return "corrupt or not an image (of no format PIL knows)"
    return f"corrupt or not an image ({type(error).__name__}: {error})"


def read_image(images, index):
    """images[index], or the next readable one if that file cannot be read. Returns (image, label,
    skipped), skipped the files passed over, each as "path: why", so that the caller can count and
    name them instead of dying on them. The scripts call it once before training, so that a data set
    of which no image can be read is one clear error."""
    skipped = []
    for offset in range(len(images)):
        at = (index + offset) % len(images)
        try:
            image, label = images[at]
            return image, label, skipped
        except READ_ERRORS as e:
            skipped.append(f"{image_path(images, at)}: {read_error(e)}")
    raise UsageError(f"none of the {len(images)} images of the data set can be read, e.g. {skipped[0]}.")


class SkippedImages:
    """The training images read_image passed over, as the loaders report them with each batch: the
    number (counts, a tensor) and, from the workers, the files (unread: per sample, its "path: why"
    lines). The first NAMED_SKIPS files are named in the log, the rest only counted."""

    def __init__(self, log):
        self.log, self.total, self.named = log, 0, 0

    def add(self, counts, unread):
        self.total += int(counts.sum())
        for line in "\n".join(text for text in unread if text).splitlines():
            self.named += 1
            if self.named <= NAMED_SKIPS:
                self.log.print(f"skipped unreadable training image {line}")
            elif self.named == NAMED_SKIPS + 1:
                self.log.print(f"skipped more than {NAMED_SKIPS} unreadable training images: "
                               "from here on they are only counted (skipped in the log lines)")


def sample_seed(seed, epoch, index):
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index) % 2**63


@contextlib.contextmanager
def sample_rng(seed):
    """The CPU generator, which the transforms draw from, seeded for one sample and restored after.
    Only that one: torch.manual_seed also queues a CUDA seeding, formatting a stack trace each time in a
    loader worker, where CUDA is not initialised (about 80 us, a tenth of a 28-px pair's two views)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


# ------------------------------------------------------------------------------------------------
# Data sets: torch Datasets of (RGB PIL image, int label), with .targets, .names and .classes
# ------------------------------------------------------------------------------------------------

class ArrayImages(Dataset):
    """Images held in memory as uint8 [n, H, W] (grey) or [n, H, W, 3]; yields (RGB PIL, label)."""

    def __init__(self, images, labels, classes):
        self.images, self.targets, self.classes = images, [int(t) for t in labels], list(classes)
        self.names = [str(i) for i in range(len(images))]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return Image.fromarray(self.images[i]).convert("RGB"), self.targets[i]

    def as_tensor(self):
        """All images as one uint8 tensor [n, C, H, W] of the values __getitem__ gives, C = 1 for grey
        images (whose RGB repeats that channel) and 3 for colour ones; for --gpu-aug to hold on the device."""
        images = torch.from_numpy(np.array(self.images))  # a copy: an IDX file's array is read-only
        return images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)


def class_folders(root):
    """An ImageFolder root's classes, sorted: its folders (links followed), hidden ones (.ipynb_checkpoints) not."""
    with os.scandir(root) as entries:
        classes = sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"Couldn't find any class folder in {root}.")  # torchvision's words
    return classes


class ImageFiles(Dataset):
    """An ImageFolder tree, read lazily; yields (RGB PIL, label). Unreadable files raise one of READ_ERRORS.
    Its images are image_paths of each class folder (class_folders), a file in two classes taken in the first:
    the order and the names (class/file) of torchvision's ImageFolder, which this replaces.

    classes: the class names whose order numbers the labels (a val/ folder takes train/'s, so that a
    class it lacks does not shift the others' labels); default: root's own folders.
    """

    def __init__(self, root, classes=None):
        own = class_folders(root)
        taken = {os.path.realpath(path) for path in [root, *(os.path.join(root, name) for name in own)]}
        self.classes = classes or own
        label = {name: i for i, name in enumerate(self.classes)}
        unknown = [name for name in own if name not in label]
        if unknown:
            raise UsageError(f"{root} has {len(unknown)} classes that the training images lack, e.g. {unknown[0]}.")
        self.paths, self.targets = [], []
        for name in own:
            paths = image_paths(os.path.join(root, name), taken)
            if not paths and classes is None:  # given the classes, an empty class folder is as fine as a missing one
                raise FileNotFoundError(f"its class folder {name} holds no image file")
            self.paths += paths
            self.targets += [label[name]] * len(paths)
        if not self.paths:
            raise FileNotFoundError("found no image in any class folder")
        self.names = [Path(path).relative_to(root).as_posix() for path in self.paths]  # class/file

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return open_image(self.paths[i]), self.targets[i]


class SyntheticImages(Dataset):
    """Deterministic labelled images for tests and benchmarks: a smooth random pattern per class plus
    per-image noise, so that a representation can separate the classes."""

    def __init__(self, size, img_size, offset=0):
        self.size, self.img_size, self.offset = size, img_size, offset
        self.targets = [i % SYNTHETIC_CLASSES for i in range(size)]
        self.classes = [f"class{i}" for i in range(SYNTHETIC_CLASSES)]
        self.names = [str(i) for i in range(size)]
        patterns = torch.rand(SYNTHETIC_CLASSES, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        self.patterns = F.interpolate(patterns, size=img_size, mode="bilinear", align_corners=False)

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return Image.fromarray(self.pixels(i).permute(1, 2, 0).numpy()), self.targets[i]

    def pixels(self, i):
        """Image i as uint8 [3, H, W]."""
        g = torch.Generator().manual_seed(self.offset + i)
        noise = 0.25 * torch.randn(3, self.img_size, self.img_size, generator=g)
        return ((self.patterns[self.targets[i]] + noise).clamp(0, 1) * 255).byte()

    def as_tensor(self):
        """All images as one uint8 tensor [n, 3, H, W], for --gpu-aug to hold on the device."""
        return torch.stack([self.pixels(i) for i in range(self.size)])


def read_idx(path):
    """An IDX file (the MNIST format) of bytes, gzipped or not, as a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # a truncated .gz ends in EOFError
        raise UsageError(f"{path} cannot be read ({type(e).__name__}: {e}).") from None
    ndim = data[3] if data[:3] == b"\0\0\x08" and len(data) > 3 else 0  # magic: two zeros, 0x08 (bytes)
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header]) if ndim and len(data) >= header else None
    if shape is None or len(data) != header + math.prod(shape):
        raise UsageError(f"{path} is not a whole IDX file of bytes.")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def idx_pair(images_path, labels_path, num_classes):
    """(images [n, H, W], labels [n]) from an MNIST-style pair of IDX files that belong together."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or labels.max(initial=0) >= num_classes:
        raise UsageError(f"{images_path} and {labels_path} are not a pair of images [n, H, W] and labels [n] below "
                         f"{num_classes} (their shapes: {list(images.shape)} and {list(labels.shape)}).")
    return images, labels


def load_fashion_mnist(data_dir, split, **_):
    """From data_dir (its IDX files, or torchvision's FashionMNIST/raw/ there) or the system's copy,
    else downloaded into data_dir."""
    train = split in TRAIN_SPLITS
    prefix = "train" if train else "t10k"
    for folder in (Path(data_dir), Path(data_dir) / "FashionMNIST" / "raw", Path(FASHION_MNIST_SYSTEM_DIR)):
        for suffix in ("", ".gz"):
            images = folder / f"{prefix}-images-idx3-ubyte{suffix}"
            labels = folder / f"{prefix}-labels-idx1-ubyte{suffix}"
            if images.exists() and labels.exists():
                return ArrayImages(*idx_pair(images, labels, len(FASHION_MNIST_CLASSES)), FASHION_MNIST_CLASSES)
    ds = torchvision.datasets.FashionMNIST(data_dir, train=train, download=True)
    return ArrayImages(ds.data.numpy(), ds.targets.tolist(), FASHION_MNIST_CLASSES)


def load_cifar(dataset, data_dir, split, **_):
    """torchvision's CIFAR10 or CIFAR100, from data_dir, else downloaded there."""
    ds = dataset(data_dir, train=split in TRAIN_SPLITS, download=True)
    return ArrayImages(ds.data, ds.targets, ds.classes)


def load_stl10(data_dir, split, **_):
    """STL-10 from data_dir, else downloaded there; pretraining also takes its 100 000 unlabelled images."""
    stl_split = {"pretrain": "train+unlabeled", "train": "train", "val": "test"}[split]
    ds = torchvision.datasets.STL10(data_dir, split=stl_split, download=True)
    return ArrayImages(ds.data.transpose(0, 2, 3, 1), ds.labels, ds.classes)


def load_synthetic(data_dir, split, size, img_size):
    """size training images (--data synthetic:SIZE; 1024 for synthetic), or a quarter as many (at least one per
    class) to evaluate on. Image i is drawn from seed i, and an evaluation image from seed
    SYNTHETIC_VAL_SEEDS + i, so that no training image is one of them."""
    size = "1024" if size is None else size
    if not size.isdigit() or not 1 <= int(size) <= SYNTHETIC_VAL_SEEDS:  # not more: the evaluation images' seeds
        raise UsageError(f"--data synthetic:{size} must give between 1 and {SYNTHETIC_VAL_SEEDS} images.")
    train, size = split in TRAIN_SPLITS, int(size)
    size = size if train else max(size // 4, SYNTHETIC_CLASSES)
    return SyntheticImages(size, img_size, offset=0 if train else SYNTHETIC_VAL_SEEDS)


@dataclass(frozen=True)
class NamedData:
    """A data set that --data names: an entry of DATA_SETS."""
    load: Callable          # load(data_dir, split, size=, img_size=) -> images (see DATA_SETS)
    native_size: int | None # the image size the data comes in; None: the img_size it is drawn at
    mean: tuple             # per-channel mean and std of its training images, for the normalisation
    std: tuple
    downloads: bool = True  # may download into data_dir


# The data sets --data names; a new one is one entry. Every data set, these and an ImageFolder
# (image_folder), is a torch Dataset of (RGB PIL image, int label) for a split: "pretrain" (unlabelled
# use, to which STL-10 adds its unlabelled images, labelled -1), "train" or "val"; and it has
#   .targets  the label of every image, in order, read without decoding the images (label fractions,
#             held-out images, the kNN bank);
#   .names    a string per image, unique in the data set and the same in every run (class/file for an
#             ImageFolder, the index otherwise): the resume guard fingerprints them (data_fingerprint),
#             and --subset-file and subset.txt name images by them;
#   .classes  the class names: label i is classes[i].
DATA_SETS = {
    "fashion-mnist": NamedData(load_fashion_mnist, 28, (0.2860,) * 3, (0.3530,) * 3),
    "cifar10": NamedData(functools.partial(load_cifar, torchvision.datasets.CIFAR10), 32,
                         (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": NamedData(functools.partial(load_cifar, torchvision.datasets.CIFAR100), 32,
                          (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": NamedData(load_stl10, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "synthetic": NamedData(load_synthetic, None, (0.5,) * 3, (0.25,) * 3, downloads=False),
}
SMALL_DATASETS = tuple(DATA_SETS)  # the names --data takes besides an ImageFolder root


def image_folder_root(data):
    """The folder of images that --data names, or None for a named data set."""
    return None if data is None or data.partition(":")[0] in DATA_SETS else data


def build_dataset(data, data_dir, split, img_size=32):
    """The images of a --data name or ImageFolder root for split (see DATA_SETS), and what is known
    about them (a DataInfo). synthetic images are drawn at img_size."""
    name, sized, size = data.partition(":")
    entry = DATA_SETS.get(name) if name == "synthetic" or not sized else None
    if entry is None:
        return image_folder(data, split in TRAIN_SPLITS)
    load = functools.partial(entry.load, data_dir, split, size=size if sized else None, img_size=img_size)
    # A download writes into --data-dir, which ranks writing at once would corrupt: they take turns.
    images = runtime.in_turns(lambda: downloaded(data, data_dir, load)) if entry.downloads else load()
    return images, DataInfo(data, len(images.classes), images.classes, entry.native_size or img_size,
                            entry.mean, entry.std, small=True)


def downloaded(data, data_dir, load):
    """load() of a data set that torchvision downloads if data_dir lacks it; its failure (offline, it
    raises OSError or RuntimeError) is one clear error."""
    try:
        return load()
    except (OSError, RuntimeError) as e:
        raise UsageError(f"could not load {data} from {data_dir} or download it ({e}).") from None


def image_folder(data, train):
    """An ImageFolder root: its train/ (or itself) for training, its val/ for evaluation."""
    root = Path(data)
    if not root.is_dir():
        raise UsageError(f"--data {data} is neither a data set name ({', '.join(SMALL_DATASETS)}) "
                         "nor an existing ImageFolder directory.")
    has_train, has_val = (root / "train").is_dir(), (root / "val").is_dir()
    if not train and not has_val:
        raise UsageError(f"{data} has no val/ folder to evaluate on.")
    if has_val and not has_train:
        raise UsageError(f"{data} has a val/ folder but no train/ folder: the training images would include "
                         "val/ as a class; put them in train/.")
    train_root = root / "train" if has_train else root
    folder = train_root if train else root / "val"
    try:
        images = ImageFiles(folder, None if train else class_folders(train_root))
    except (FileNotFoundError, OSError) as e:
        raise UsageError(f"{folder} is not an ImageFolder root with one folder of images per class ({e}).") from None
    return images, DataInfo(folder.name, len(images.classes), images.classes, 224, IMAGENET_MEAN, IMAGENET_STD, False)


# ------------------------------------------------------------------------------------------------
# Subsets drawn per class: finetune.py's labelled subsets, and the held-out training images on which
# finetune.py and eval_knn.py choose settings without the test split
# ------------------------------------------------------------------------------------------------

def per_class_draw(targets, counts, seed):
    """Sorted indices of counts[c] images drawn from each class c by a seeded generator."""
    targets = torch.as_tensor(targets)
    generator = torch.Generator().manual_seed(seed)
    by_class = torch.argsort(targets, stable=True).split(torch.bincount(targets).tolist())
    chosen = [members[torch.randperm(len(members), generator=generator)[:count]]
              for members, count in zip(by_class, counts)]
    return torch.cat(chosen).sort().values.tolist()


def other_indices(n, indices):
    """The indices of range(n) that are not in indices, in order, as a tensor."""
    kept = torch.ones(n, dtype=torch.bool)
    kept[indices] = False
    return kept.nonzero().squeeze(1)


def held_out_subset(targets, labelled, size, seed):
    """Sorted indices of `size` training images outside the labelled subset, each class giving the same
    share of its images there (size * n_c / n, the largest remainders rounded up so that the shares add up
    to size), drawn apart from it: a validation set for choosing hyperparameters (as the field's 10k images
    held out of the ImageNet train split) that leaves the test split untouched."""
    targets = torch.as_tensor(targets)
    rest = other_indices(len(targets), labelled)
    if not 0 < size <= len(rest):
        raise UsageError(f"--holdout {size} must be between 1 and the {len(rest)} training images it can hold out.")
    sizes = torch.bincount(targets[rest]).tolist()
    counts = [size * n // len(rest) for n in sizes]  # exact, in integers
    by_remainder = sorted(range(len(sizes)), key=lambda c: -(size * sizes[c] % len(rest)))  # stable: ties by class
    for c in by_remainder[:size - sum(counts)]:
        counts[c] += 1
    return rest[per_class_draw(targets[rest], counts, seed + 1)].tolist()


# ------------------------------------------------------------------------------------------------
# Augmentation and sampling that the training scripts share
# ------------------------------------------------------------------------------------------------

class GaussianBlur(T.GaussianBlur):
    """torchvision's GaussianBlur (the same random sigma, kernel, reflect padding and rounding), one
    axis at a time instead of with a 2-d kernel: at 224 px its 23 x 23 kernel took 12 ms of a CPU core
    per image, half of a loader worker's time for a pair of views; this takes under 2 ms."""

    def forward(self, img):
        sigma = self.get_params(self.sigma[0], self.sigma[1])
        if isinstance(img, Image.Image):
            return TF.to_pil_image(separable_gaussian_blur(TF.pil_to_tensor(img), self.kernel_size, sigma),
                                   mode=img.mode)
        return separable_gaussian_blur(img, self.kernel_size, sigma)


def separable_gaussian_blur(image, kernel_size, sigma):
    """A [..., H, W] image blurred by the normalised Gaussian of torchvision's gaussian_blur, as a
    weighted sum of shifted copies along each axis; integer images are rounded back, as there."""
    kx, ky = kernel_size
    height, width = image.shape[-2:]
    x = image.float() if not image.is_floating_point() else image
    x = F.pad(x.reshape(-1, 1, height, width), [kx // 2, kx // 2, ky // 2, ky // 2], mode="reflect")
    for axis, k in ((-1, kx), (-2, ky)):
        offsets = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k)
        weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
        weights = (weights / weights.sum()).tolist()
        size = x.shape[axis] - k + 1
        out = x.narrow(axis, 0, size) * weights[0]
        for shift in range(1, k):
            out.add_(x.narrow(axis, shift, size), alpha=weights[shift])
        x = out
    x = x.reshape(image.shape)
    return x if image.is_floating_point() else x.round().to(image.dtype)


def epoch_order(size, seed, epoch):
    """The data order of (seed, epoch): for epoch 0 the permutation torch draws from seed, as every version
    had it; for later epochs numpy's, drawn from the pair itself. Earlier versions seeded epoch e with seed + e
    (seed 1 saw seed 0's orders an epoch later), and torch's generator keeps only 32 bits of its seed, too few
    to give every pair its own."""
    if epoch == 0:
        return torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(size))


class EpochSampler(Sampler):
    """Yields (epoch, index) for this rank's part of each global micro-batch.

    Global micro-batch b of an epoch is perm[b*G : (b+1)*G] of a per-epoch seeded permutation, and
    rank r takes the r-th contiguous slice of it, so the global batch, in rank order, is the same for
    any world size. Only whole micro-batches are used; start_batch skips those already trained on.
    """

    def __init__(self, size, global_batch, num_batches, world_size, rank, seed):
        self.size, self.global_batch, self.num_batches = size, global_batch, num_batches
        self.local_batch = global_batch // world_size
        self.rank, self.seed = rank, seed
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return (self.num_batches - self.start_batch) * self.local_batch

    def __iter__(self):
        for indices in self.batches():
            for i in indices.tolist():
                yield self.epoch, i

    def batches(self, device="cpu"):
        """This rank's indices of each micro-batch from start_batch on, as tensors on device (the
        epoch's permutation is copied there once)."""
        order = epoch_order(self.size, self.seed, self.epoch).to(device)
        for b in range(self.start_batch, self.num_batches):
            first = b * self.global_batch + self.rank * self.local_batch
            yield order[first:first + self.local_batch]


# ------------------------------------------------------------------------------------------------
# Evaluation images: the centre crop, no augmentation
# ------------------------------------------------------------------------------------------------

def eval_resize(info, img_size):
    """The shorter side before the centre crop: 256 for a 224 crop of ImageNet-size data, else the crop."""
    return img_size if info.small else round(img_size * 256 / 224)


def eval_transform(img_size, resize, mean=None, std=None):
    """Resize the shorter side to resize, then the centre crop: normalised floats given mean and std, else
    uint8 (the fine-tuned classifier normalises inside)."""
    steps = [T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(img_size)]
    if mean is None:
        return T.Compose([*steps, T.PILToTensor()])
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


class CentreCrops(Dataset):
    """Evaluation samples of images through an evaluation transform: (image, label, "path: why" if its
    file cannot be read, else ""). An unreadable image is an error of the evaluation (kNN features,
    fine-tuning accuracy), not skipped, as skipping it would change the result; a 1-pixel stand-in
    carries its "path: why" to the main process, which raises it."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        try:
            image, label = self.images[index]
            return self.transform(image), label, ""
        except READ_ERRORS as e:
            why = f"{image_path(self.images, index)}: {read_error(e)}"
            return self.transform(Image.new("RGB", (1, 1))), -1, why
