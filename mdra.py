"""MDRA: Multi-Dimensional Relation Alignment, self-supervised pretraining.

The whole method in one file, read top to bottom: the loss (two augmented views, an online encoder
(backbone f, projector g, predictor h) trained by back-propagation, an offline encoder (f', g') that is
its moving average, a queue of past offline embeddings as negatives, the relation alignment computed in
G subspaces), the networks, the optimizer, the data and the training loop (MDRA_SPEC.md sections 2-6
and 8). The machinery it shares with eval_knn.py and finetune.py (processes, signals, logging,
checkpoints, the shared flags) is runtime.py's; the weighted kNN of its monitor is knn.py's.

Launch:
    python mdra.py --data fashion-mnist --arch resnet18 --epochs 1       # one process, CPU or GPU
    torchrun --nproc_per_node=8 mdra.py --data /path/to/imagenet          # the patent's recipe
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 \\
        --nproc_per_node=8 mdra.py --data /path/to/imagenet               # node 0 of 2 (node 1: --node_rank=1)

Starting again with the same --out-dir resumes from <out-dir>/checkpoint.pth.
"""
import argparse
import contextlib
import copy
import datetime
import functools
import gzip
import inspect
import json
import math
import os
import shlex
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Dataset, Sampler, Subset
from torchvision.datasets.folder import find_classes
from torchvision import transforms as T
from torchvision.transforms import functional as TF

import knn
import runtime
from runtime import UsageError

EMBED_DIM = 256  # D, the output of projector and predictor
HIDDEN_DIM = 4096


# ------------------------------------------------------------------------------------------------
# The method (spec sections 3-5): small pure functions with the spec's symbols.
# ------------------------------------------------------------------------------------------------

def normalize_subspaces(x, groups):
    """[..., D] -> [..., G, D/G]: split into G contiguous subspaces and L2-normalise each slice."""
    return F.normalize(x.unflatten(-1, (groups, -1)), dim=-1)


@torch.no_grad()
def sinkhorn(scores, mu=0.05, iters=3):
    """Offline relation R with the balance constraint, by Sinkhorn-Knopp (spec section 3).

    scores: K [..., B_local, N], cosine similarities of this rank's rows to the N negatives.
    Returns R [..., B_local, N] = B * Diag(alpha) exp(K / mu) Diag(beta). What is exact: after the
    last (row) step every row of R sums to 1. The column sums are only close to B/N: a few iterations
    approach the balance, they do not reach it. Rows may live on several ranks; the max, the column
    sums and B are all-reduced, so R equals the single-process result for the same global batch.
    iters = 0 drops the balance constraint: each row is softmax_j(K[i, j] / mu), and needs no other rank.
    """
    K = scores.float()
    if iters == 0:  # no balance constraint (an ablation): R is a plain row softmax of K / mu, as in ReSSL
        return torch.softmax(K / mu, dim=-1)
    B = runtime.all_reduce(K.new_full((), K.shape[-2]))  # filled on the device: no host-to-device copy, no sync
    N = K.shape[-1]
    K_max = runtime.all_reduce(K.amax(dim=(-2, -1), keepdim=True), op=dist.ReduceOp.MAX)
    E = (K - K_max).div_(mu).exp_()  # exp((K - max K) / mu): the max only guards against overflow
    for _ in range(iters):
        E /= runtime.all_reduce(E.sum(dim=-2, keepdim=True))  # E /= column sums
        E /= N                                          # E /= N: every column sums to 1/N
        E /= E.sum(dim=-1, keepdim=True)                # E /= row sums
        E /= B                                          # E /= B: every row sums to 1/B
    return E * B                                        # R = E B: every row sums to 1


def mdra_loss(q1, q2, k1, k2, queue, groups=4, tau=0.04, mu=0.05, sinkhorn_iters=3, *, cross=True):
    """L_MDRA (spec sections 3-4), the mean over this rank's rows.

    q1, q2: [B_local, D] online predictions h(g(f(v))) of views 1 and 2 (un-normalised).
    k1, k2: [B_local, D] offline projections g'(f'(v)) of views 1 and 2 (un-normalised).
    queue:  [N, D] the negatives k_j.
    Per subspace g: log P_a = log_softmax_j(q_a . k_j / tau), R_b = sinkhorn(k_b . k_j, mu),
    L_RA^g = 1/2 [CE(R_2, P_1) + CE(R_1, P_2)]; L_MDRA = (1/G) sum_g L_RA^g.
    cross=False (an ablation) aligns each view with its own offline relation: 1/2 [CE(R_1, P_1) + CE(R_2, P_2)].
    Everything runs in float32 outside autocast; gradients flow only through q.
    """
    with torch.autocast(q1.device.type, enabled=False):
        # [G, D/G, N]: every subspace slice of every negative, normalised, laid out for the products below
        negatives = normalize_subspaces(queue.float().detach(), groups).permute(1, 2, 0).contiguous()

        def similarities(z, scale=1.0):  # [B, D] -> [G, B, N]: scale * z_i . k_j within each subspace
            # 1/tau scales the [B, G, D/G] slices rather than the [G, B, N] product: fewer elements
            return torch.matmul((normalize_subspaces(z.float(), groups) * scale).transpose(0, 1), negatives)

        def cross_entropy(R, log_P):  # CE(R, P) = -(1/B) sum_i sum_j R[i, j] log P[i, j], per subspace: [G]
            return -(R * log_P).sum(dim=-1).mean(dim=-1)

        R1 = sinkhorn(similarities(k1.detach()), mu, sinkhorn_iters)  # [G, B, N]
        R2 = sinkhorn(similarities(k2.detach()), mu, sinkhorn_iters)
        log_P1 = F.log_softmax(similarities(q1, 1 / tau), dim=-1)     # [G, B, N]
        log_P2 = F.log_softmax(similarities(q2, 1 / tau), dim=-1)
        target1, target2 = (R2, R1) if cross else (R1, R2)  # cross alignment: P_1 towards R_2, P_2 towards R_1
        L_RA = 0.5 * (cross_entropy(target1, log_P1) + cross_entropy(target2, log_P2))  # [G]: L_RA^g
        return L_RA.mean()                                                    # (1/G) sum_g L_RA^g


def effective_rank(z):
    """RankMe (Garrido et al., 2023): exp of the entropy of the normalised singular values of a
    batch of embeddings. Near 1 means collapse; near min(B, D) means the dimensions are all used."""
    s = torch.linalg.svdvals(z.float())
    p = s / s.sum() + 1e-7
    return torch.exp(-(p * p.log()).sum())


# ------------------------------------------------------------------------------------------------
# Networks (spec section 2)
# ------------------------------------------------------------------------------------------------

def resnet_names():
    return sorted(n for n in torchvision.models.list_models(module=torchvision.models)
                  if "resnet" in n or "resnext" in n)


def build_backbone(arch, small_stem):
    """A torchvision ResNet without its fc; returns (module, feature width)."""
    if arch not in resnet_names():
        raise UsageError(f"--arch {arch} is not a torchvision ResNet; choose one of {', '.join(resnet_names())}.")
    net = torchvision.models.get_model(arch, weights=None)
    if small_stem:  # 3x3 stride-1 first conv and no max-pool keep small images from shrinking to 1 px
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    width = net.fc.in_features
    net.fc = nn.Identity()
    return net, width


def min_img_size(small_stem):
    """The smallest crop a backbone processes meaningfully: one that its last stage still sees as one
    pixel of its own, not one made of padding. layer2, layer3 and layer4 each halve the resolution
    (8x, all the small stem does); the ImageNet stem's stride-2 conv and max-pool add 4x (32x)."""
    return 8 if small_stem else 32


def mlp(in_dim, hidden_dim=HIDDEN_DIM, out_dim=EMBED_DIM):
    """Projector g and predictor h: Linear -> BatchNorm1d -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class PerView:
    """A BatchNorm layer that, in train mode, normalises each half of its batch (view 1, then view 2) as its
    own batch: the running statistics move once per view, view 1 first, as in two separate passes. Its
    parameters, buffers and state-dict keys are its torch class's (it is mixed in first, below)."""

    def forward(self, x):
        if not self.training:  # running statistics: each image alone, the same in one pass or two
            return super().forward(x)
        normalise = super().forward
        return torch.cat([normalise(view) for view in x.chunk(2)])


class PerViewBatchNorm1d(PerView, nn.BatchNorm1d):
    pass


class PerViewBatchNorm2d(PerView, nn.BatchNorm2d):
    pass


class PerViewSyncBatchNorm(PerView, nn.SyncBatchNorm):  # each view's statistics over all ranks' halves
    pass


PER_VIEW = {nn.BatchNorm1d: PerViewBatchNorm1d, nn.BatchNorm2d: PerViewBatchNorm2d,
            nn.SyncBatchNorm: PerViewSyncBatchNorm}


def two_views(net, v1, v2, one_pass):
    """(net(v1), net(v2)): two passes, or one of torch.cat([v1, v2]) whose output is split again."""
    if one_pass:
        return net(torch.cat([v1, v2])).chunk(2)
    return net(v1), net(v2)


class Encoder(nn.Module):
    """Backbone f and projector g; the offline encoder is a moving-average copy of this."""
    one_pass = False  # both views as one batch (both_views_in_one_pass)

    def __init__(self, backbone, width):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(width)

    def forward(self, x):
        return self.projector(self.backbone(x))

    def both(self, v1, v2):
        return two_views(self, v1, v2, self.one_pass)


class Online(nn.Module):
    """The online branch: q = h(g(f(v))) for both views. Each view is its own batch for BatchNorm, in two
    passes or in one (both_views_in_one_pass).
    Without a predictor (an ablation), h is the identity and q = g(f(v)); its state dict then has no
    predictor keys."""

    def __init__(self, encoder, predictor=True):
        super().__init__()
        self.encoder = encoder
        self.predictor = mlp(EMBED_DIM) if predictor else nn.Identity()

    def forward(self, v1, v2):
        return two_views(lambda v: self.predictor(self.encoder(v)), v1, v2, self.encoder.one_pass)


def both_views_in_one_pass(net):
    """--one-pass: the encoders in net (an Encoder, or Online) run views 1 and 2 as one batch of 2B through
    their convolutions and linear layers, and each BatchNorm layer becomes its PerView twin in place (after
    any SyncBatchNorm conversion), so that outputs, gradients and running statistics stay those of two
    passes and the state dict keeps its keys."""
    for module in net.modules():
        if type(module) in PER_VIEW:
            module.__class__ = PER_VIEW[type(module)]
        if isinstance(module, Encoder):
            module.one_pass = True
    return net


def build_model(arch, small_stem, predictor=True):
    """Returns (online, offline, feature width). The offline encoder starts as a copy, never gets
    gradients, and runs in train mode (batch statistics), as in BYOL."""
    backbone, width = build_backbone(arch, small_stem)
    online = Online(Encoder(backbone, width), predictor)
    offline = copy.deepcopy(online.encoder).requires_grad_(False)
    return online, offline, width


@torch.no_grad()
def ema_update(online, offline, m):
    """xi <- m xi + (1 - m) theta over the encoder's parameters; BatchNorm buffers are copied."""
    torch._foreach_lerp_(list(offline.parameters()), list(online.encoder.parameters()), 1.0 - m)
    torch._foreach_copy_(list(offline.buffers()), list(online.encoder.buffers()))


@torch.no_grad()
def enqueue(queue, ptr, keys):
    """FIFO: write the newest keys over the oldest entries; returns the new pointer.
    N is a multiple of the number of keys, so a write never wraps in the middle."""
    queue[ptr:ptr + keys.shape[0]] = keys
    return (ptr + keys.shape[0]) % queue.shape[0]


def init_queue(size, groups, seed):
    """Random entries, each subspace slice normalised; the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    return normalize_subspaces(torch.randn(size, EMBED_DIM, generator=g), groups).flatten(1)


# ------------------------------------------------------------------------------------------------
# Optimiser and schedules (spec section 6)
# ------------------------------------------------------------------------------------------------

class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al., 2017).

    Parameter groups with lars_exclude=True (biases and BatchNorm) get neither weight decay nor the
    trust ratio. The update of a group is a few multi-tensor (foreach) kernels, not a few per
    parameter, and torch.where keeps the ratios on the device: no host sync. step(lr=) takes the learning
    rate as a device tensor instead of the groups' (--cuda-graph), read on the device, so that a captured
    step follows the schedule.
    """

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=1e-3):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None, lr=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [p.grad for p in params]
            if not group["lars_exclude"]:
                updates = torch._foreach_add(updates, params, alpha=group["weight_decay"])
                p_norms = torch.stack(torch._foreach_norm(params))
                u_norms = torch.stack(torch._foreach_norm(updates))
                trust = torch.where((p_norms > 0) & (u_norms > 0),
                                    group["trust_coefficient"] * p_norms / u_norms, 1.0)
                torch._foreach_mul_(updates, list(trust.unbind()))
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            if lr is not None:
                torch._foreach_sub_(params, torch._foreach_mul(buffers, lr))
            else:
                torch._foreach_add_(params, buffers, alpha=-group["lr"])


def lars_param_groups(model, weight_decay):
    """Biases and BatchNorm parameters (the 1-d ones) are excluded from decay and adaptation."""
    regular = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    excluded = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [dict(params=regular, weight_decay=weight_decay),
            dict(params=excluded, weight_decay=0.0, lars_exclude=True)]


def warmup_cosine(base, total_steps, warmup_steps):
    """Per-step values: linear from 0 to base over warmup_steps, then cosine from base to 0."""
    steps = np.arange(total_steps, dtype=np.float64)
    cosine = 0.5 * base * (1 + np.cos(np.pi * (steps - warmup_steps) / max(1, total_steps - warmup_steps)))
    return np.where(steps < warmup_steps, base * steps / max(1, warmup_steps), cosine)


# ------------------------------------------------------------------------------------------------
# Data (spec section 6)
# ------------------------------------------------------------------------------------------------

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


class ArrayImages(Dataset):
    """Images held in memory as uint8 [n, H, W] (grey) or [n, H, W, 3]; yields (RGB PIL, label)."""

    def __init__(self, images, labels, classes):
        self.images, self.targets, self.classes = images, [int(t) for t in labels], list(classes)
        self.names = [str(i) for i in range(len(images))]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return Image.fromarray(self.images[i]).convert("RGB"), self.targets[i]

    def as_tensor(self, indices=None):
        """The images (those at indices, default all) as one uint8 tensor [n, C, H, W] of the values
        __getitem__ gives, C = 1 for grey images (whose RGB repeats that channel) and 3 for colour ones; for
        --gpu-aug to hold on the device."""
        images = np.asarray(self.images)
        # a copy either way: an IDX file's array is read-only
        images = torch.from_numpy(images.copy() if indices is None else images[np.asarray(indices, dtype=np.int64)])
        return images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)


class ImageFiles(Dataset):
    """An ImageFolder tree, read lazily; yields (RGB PIL, label). Unreadable files raise OSError.

    classes: the class names whose order numbers the labels (a val/ folder takes train/'s, so that a
    class it lacks does not shift the others' labels); default: root's own folders.
    """

    def __init__(self, root, classes=None):
        # Given the classes, an empty class folder is as fine as a missing one.
        folder = torchvision.datasets.ImageFolder(root, loader=lambda path: path, allow_empty=classes is not None)
        if not folder.samples:
            raise FileNotFoundError("found no image in any class folder")
        self.classes = classes or folder.classes
        label = {name: i for i, name in enumerate(self.classes)}
        unknown = [name for name in folder.classes if name not in label]
        if unknown:
            raise UsageError(f"{root} has {len(unknown)} classes that the training images lack, e.g. {unknown[0]}.")
        self.paths = [path for path, _ in folder.samples]
        self.targets = [label[folder.classes[index]] for _, index in folder.samples]
        self.names = [Path(path).relative_to(root).as_posix() for path in self.paths]  # class/file

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with open(self.paths[i], "rb") as f:
            return runtime.rgb(Image.open(f)), self.targets[i]


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

    def as_tensor(self, indices=None):
        """The images (those at indices, default all) as one uint8 tensor [n, 3, H, W], for --gpu-aug to
        hold on the device."""
        return torch.stack([self.pixels(i) for i in (range(self.size) if indices is None else indices)])


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


def load_synthetic(data_dir, split, synthetic_size, img_size):
    """synthetic_size training images, or a quarter as many (at least one per class) to evaluate on. Image i
    is drawn from seed i, and an evaluation image from seed SYNTHETIC_VAL_SEEDS + i, so that no training
    image is one of them."""
    if synthetic_size < 1:
        raise UsageError("--synthetic-size must be at least 1.")
    if synthetic_size > SYNTHETIC_VAL_SEEDS:  # refused here rather than by the memory of its labels and names
        raise UsageError(f"--synthetic-size must be at most {SYNTHETIC_VAL_SEEDS}: the evaluation images are drawn "
                         f"from the seeds after that, so more training images would repeat them.")
    train = split in TRAIN_SPLITS
    size = synthetic_size if train else max(synthetic_size // 4, SYNTHETIC_CLASSES)
    return SyntheticImages(size, img_size, offset=0 if train else SYNTHETIC_VAL_SEEDS)


@dataclass(frozen=True)
class NamedData:
    """A data set that --data names: an entry of DATA_SETS."""
    load: Callable          # load(data_dir, split, synthetic_size=, img_size=) -> images (see DATA_SETS)
    native_size: int | None # the image size the data comes in; None: the img_size it is drawn at
    mean: tuple             # per-channel mean and std of its training images, for the normalisation
    std: tuple
    downloads: bool = True  # may download into data_dir
    small: bool = True      # a small-image data set: small stem and the small-data preset


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


def build_dataset(data, data_dir, split, synthetic_size=1024, img_size=32):
    """The images of a --data name or ImageFolder root for split (see DATA_SETS), and what is known
    about them (a DataInfo)."""
    entry = DATA_SETS.get(data)
    if entry is None:
        return image_folder(data, split in TRAIN_SPLITS)
    load = functools.partial(entry.load, data_dir, split, synthetic_size=synthetic_size, img_size=img_size)
    # A download writes into --data-dir, which ranks writing at once would corrupt: they take turns.
    images = runtime.in_turns(lambda: downloaded(data, data_dir, load)) if entry.downloads else load()
    return images, DataInfo(data, len(images.classes), images.classes, entry.native_size or img_size,
                            entry.mean, entry.std, entry.small)


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
        images = ImageFiles(folder, None if train else find_classes(train_root)[0])
    except (FileNotFoundError, OSError) as e:
        raise UsageError(f"{folder} is not an ImageFolder root with one folder of images per class ({e}).") from None
    return images, DataInfo(folder.name, len(images.classes), images.classes, 224, IMAGENET_MEAN, IMAGENET_STD, False)


# Subsets of the training images, drawn per class: finetune.py's labelled subsets, and the held-out
# images on which finetune.py and eval_knn.py choose settings without the test split.
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
    weighted sum of shifted copies along each axis (faster on a CPU than a convolution with a thin
    kernel); integer images are rounded back, as there."""
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


@dataclass(frozen=True)
class ViewAugmentation:
    """One view's augmentation, in the order it is applied; ranges are (low, high). The CPU path
    applies it to PIL images as torchvision transforms (view_transform), gpu_aug.py to batches of
    tensors, reading these fields."""
    size: tuple                       # RandomResizedCrop: the output (H, W)
    scale: tuple                      # RandomResizedCrop: the fraction of the image area
    ratio: tuple = (3 / 4, 4 / 3)     # RandomResizedCrop: the aspect ratio w / h
    flip_p: float = 0.0               # horizontal flip
    jitter_p: float = 0.0             # colour jitter, its operations in a random order
    jitter: tuple = (None,) * 4       # the ranges of the brightness, contrast, saturation and hue factors (None: off)
    grey_p: float = 0.0
    blur_p: float = 0.0               # Gaussian blur
    blur_kernel: int = 1
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: int = 128     # solarize inverts the pixels from this value up, on the 0-255 scale
    mean: tuple = (0.0, 0.0, 0.0)     # the normalisation, last
    std: tuple = (1.0, 1.0, 1.0)


def view_augmentations(info, img_size, solarize=0.0):
    """The augmentations T1, T2 of the two views (spec section 6); only the blur and solarize differ.
    Images of 32 px or less are not blurred."""
    blur = img_size > 32
    view1 = ViewAugmentation(
        size=(img_size, img_size), scale=(0.2, 1.0) if info.small else (0.08, 1.0),
        flip_p=0.5,
        jitter_p=0.8, jitter=((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)),  # ColorJitter(0.4, 0.4, 0.2, 0.1)
        grey_p=0.2,
        blur_p=1.0 if blur else 0.0, blur_kernel=int(0.1 * img_size) // 2 * 2 + 1, blur_sigma=(0.1, 2.0),
        mean=tuple(info.mean), std=tuple(info.std))
    view2 = replace(view1, blur_p=0.1 if blur else 0.0, solarize_p=solarize)
    return view1, view2


def weak_view(view):
    """ReSSL's weaker teacher view of a view's augmentation (--offline-view weak): its crop and flip, without
    its colour jitter, greyscale, blur or solarize."""
    return replace(view, jitter_p=0.0, grey_p=0.0, blur_p=0.0, solarize_p=0.0)


def view_transform(view):
    """A ViewAugmentation as torchvision transforms of a PIL image, for the CPU path. A step that never
    happens (probability 0) is left out: it would still draw a random number."""
    crop = T.RandomResizedCrop(view.size, scale=view.scale, ratio=view.ratio,
                               interpolation=T.InterpolationMode.BICUBIC)
    jitter = T.ColorJitter(*(0 if factors is None else factors for factors in view.jitter))
    steps = [(view.flip_p, T.RandomHorizontalFlip(view.flip_p)),
             (view.jitter_p, T.RandomApply([jitter], p=view.jitter_p)),
             (view.grey_p, T.RandomGrayscale(view.grey_p)),
             (view.blur_p, T.RandomApply([GaussianBlur(view.blur_kernel, sigma=view.blur_sigma)], p=view.blur_p)),
             (view.solarize_p, T.RandomSolarize(view.solarize_threshold, p=view.solarize_p))]
    return T.Compose([crop, *(step for p, step in steps if p > 0), T.ToTensor(), T.Normalize(view.mean, view.std)])


def pretrain_transforms(info, img_size, solarize=0.0):
    """The CPU path's T1, T2: view_augmentations as torchvision transforms."""
    return [view_transform(view) for view in view_augmentations(info, img_size, solarize)]


def eval_transform(info, img_size):
    """Centre crop, no augmentation: resize 256 / crop 224 for ImageNet-size data, native size else."""
    resize = img_size if info.small else round(img_size * 256 / 224)
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(img_size),
                      T.ToTensor(), T.Normalize(info.mean, info.std)])


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
        except runtime.READ_ERRORS as e:
            why = f"{runtime.image_path(self.images, index)}: {runtime.read_error(e)}"
            return self.transform(Image.new("RGB", (1, 1))), -1, why


class TwoViews(Dataset):
    """Pretraining samples: indexed by (epoch, index), each seeds its own augmentation, so the views
    depend only on (seed, epoch, index): not on workers, ranks, or whether the run was resumed.
    offline_views: the transforms of the offline encoder's own two views (--offline-view weak), drawn
    after the two views, which they leave as they are; none: the offline encoder sees the two views."""

    def __init__(self, images, view1, view2, seed, offline_views=()):
        self.images, self.view1, self.view2, self.seed = images, view1, view2, seed
        self.offline_views = tuple(offline_views)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        epoch, index = key
        image, _, skipped = runtime.read_image(self.images, index)
        with runtime.sample_rng(runtime.sample_seed(self.seed, epoch, index)):
            views = [view(image) for view in (self.view1, self.view2, *self.offline_views)]
        return *views, len(skipped), "\n".join(skipped)


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
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).to(device)
        for b in range(self.start_batch, self.num_batches):
            first = b * self.global_batch + self.rank * self.local_batch
            yield order[first:first + self.local_batch]


def pretrain_loader(images, info, args, env, num_batches):
    """This rank's pretraining micro-batches; returns (loader, sampler, device_views).

    The loader yields (v1, v2, skipped, unread): per sample, the number of files read_image passed
    over and their "path: why" lines (SkippedImages); with --offline-view weak, (v1, v2, w1, w2, skipped,
    unread), w1 and w2 the offline encoder's views. With --gpu-aug its workers only read the files:
    it yields (undecoded images, skipped, unread), and device_views(images, skipped, epoch, batch index)
    decodes and augments them on the device into (v1, v2, skipped), or (v1, v2, w1, w2, skipped). An
    in-memory data set is then held on the device instead, and the loader is a gpu_aug.ResidentImages,
    which gathers each micro-batch there, without workers. epoch_batches gives any of them as the CPU
    loader's batches.
    """
    sampler = EpochSampler(len(images), args.batch_size, num_batches, env.world_size, env.rank, args.seed)
    cuda = env.device.type == "cuda"
    views = view_augmentations(info, args.img_size, args.solarize)
    # --offline-view weak: the offline encoder's own two views, crop and flip alone (both views' weak forms are one)
    offline_views = (weak_view(views[0]),) * 2 if args.offline_view == "weak" else ()
    if args.gpu_aug:
        import gpu_aug  # the optional device path lives in its own module
        device_views = gpu_aug.DeviceTwoViews(*views, args.seed, env.rank, env.world_size, env.device, offline_views)
        if isinstance(images, (ArrayImages, SyntheticImages)):
            return gpu_aug.ResidentImages(images.as_tensor(), sampler, env.device), sampler, device_views
        dataset, collate = gpu_aug.UndecodedImages(images, jpeg_bytes=cuda), gpu_aug.collate_undecoded
    else:
        view1, view2, *offline = map(view_transform, (*views, *offline_views))
        dataset, collate, device_views = TwoViews(images, view1, view2, args.seed, offline), None, None
    loader = runtime.data_loader(dataset, args.batch_size // env.world_size, args.workers, env.device, sampler=sampler,
                                 collate_fn=collate)
    return loader, sampler, device_views


def epoch_batches(loader, device_views, epoch, start_batch):
    """An epoch's (v1, v2, skipped, unread) micro-batches, from global micro-batch start_batch on. With
    --gpu-aug a background thread makes the views of the next ones while the current step runs."""
    if device_views is None:
        yield from loader
        return
    prefetcher = device_views.prefetch(iter(loader), epoch, start_batch)
    try:
        yield from prefetcher
    finally:  # also when the run ends inside the epoch and closes this generator
        prefetcher.close()


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

# What a resumed run may change besides the shared runtime.RUN_FLAGS: how BatchNorm is synchronised, whether
# both views share a pass, whether the step is captured, how often it keeps copies and evaluates. The rest (the method, the data, the
# schedule, the seed) must be the interrupted run's.
RESUME_MAY_CHANGE = runtime.RUN_FLAGS + ("sync_bn", "one_pass", "cuda_graph", "keep_every", "knn_every", "knn_subset")


def micro_step(online, offline, queue, queue_ptr, v1, v2, args, autocast, scaler, sync_grads=True, offline_views=()):
    """One micro-batch: both branches, the loss, its backward (scaled for accumulation), then the
    queue update. The offline encoder sees offline_views (--offline-view weak) if given, else v1 and v2.
    Returns (detached loss, the enqueued keys, the new queue pointer)."""
    # DDP all-reduces gradients only when sync_grads: on the last micro-batch of an optimizer step.
    with (contextlib.nullcontext() if sync_grads or not isinstance(online, DDP) else online.no_sync()):
        with autocast:
            q1, q2 = online(v1, v2)
            with torch.no_grad():
                k1, k2 = offline.both(*(offline_views or (v1, v2)))
        loss = mdra_loss(q1, q2, k1, k2, queue, args.groups, args.tau, args.mu, args.sinkhorn_iters, cross=args.cross)
        scaler.scale(loss / args.accum_steps).backward()
    # The queue moves once per micro-batch, after the loss that used it.
    keys = runtime.all_gather_rows(normalize_subspaces(k1.to(queue.dtype), args.groups).flatten(1))
    return loss.detach(), keys, enqueue(queue, queue_ptr, keys)


# DDP that does not broadcast the BatchNorm buffers in forward: each rank keeps its own statistics. torch 2.14
# renamed the switch, and warns at the old name; the new one also broadcasts them once, when DDP wraps the
# network, where every rank's are equal (the same initialisation or checkpoint): that changes nothing.
NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                          else {"broadcast_buffers": False})


class Pretraining:
    """What the loop trains and saves: the networks, the queue, LARS and its schedule, and the step.
    A checkpoint in --out-dir is resumed (state() is the checkpoint, restore() reads one back)."""

    def __init__(self, args, env, images, info, log):
        self.args, self.env, self.info, self.log = args, env, info, log
        device = env.device
        self.batch_images = args.batch_size * args.accum_steps  # per optimizer step
        self.steps_per_epoch = len(images) // self.batch_images
        if self.steps_per_epoch == 0:
            raise UsageError(f"the data set has {len(images)} images, fewer than one optimizer step "
                             f"({args.batch_size} x {args.accum_steps}).")
        self.total_steps = args.epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, args.max_steps) if args.max_steps else self.total_steps

        torch.manual_seed(args.seed)  # the same on every rank: the same initial weights and queue everywhere
        online, offline, self.width = build_model(args.arch, args.small_stem, args.predictor)
        if args.sync_bn:
            online = nn.SyncBatchNorm.convert_sync_batchnorm(online)
            offline = nn.SyncBatchNorm.convert_sync_batchnorm(offline)
        if args.one_pass:
            online, offline = both_views_in_one_pass(online), both_views_in_one_pass(offline)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.online = online.to(device, memory_format=self.memory_format)
        self.offline = offline.to(device, memory_format=self.memory_format)
        self.queue, self.queue_ptr = init_queue(args.queue_size, args.groups, args.seed).to(device), 0
        self.lr_schedule = warmup_cosine(args.lr * self.batch_images / 256, self.total_steps,
                                         int(args.warmup_epochs * self.steps_per_epoch))
        self.optimizer = LARS(lars_param_groups(online, args.weight_decay), momentum=0.9)
        amp_dtype = runtime.AMP_DTYPES[args.amp]
        self.autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
        self.data = runtime.data_fingerprint(images.names)
        # the images each BatchNorm layer normalises over (require_same_batchnorm_batch)
        self.batchnorm_batch = args.batch_size // (1 if args.sync_bn else env.world_size)
        # The epoch's loss so far, summed over the steps from epoch_loss_from on; kept in the checkpoint, so
        # that a run resumed inside an epoch logs the mean of all the epoch's steps.
        self.epoch_loss_sum, self.epoch_loss_from, self.epoch_loss = torch.zeros((), device=device), 0, None
        self.ckpt_path = Path(args.out_dir) / "checkpoint.pth"
        self.step = self.restore(self.ckpt_path) if self.ckpt_path.exists() else 0
        runtime.require_same_on_every_rank(env, runtime.resumed_state(self.step, self.data))
        # Per-rank randomness from here on, a function of the step: a resumed run needs none of the saved
        # generator states (kept in the checkpoint for the record), and may run on another number of ranks
        # when SyncBatchNorm keeps the images each BatchNorm sees (require_same_batchnorm_batch).
        torch.manual_seed(args.seed + env.rank + self.step)

        self.trained = online  # what the loop calls: compiled in place (state-dict keys stay plain), DDP-wrapped
        if args.compile:
            online.encoder.compile(backend=args.compile_backend)
            online.predictor.compile(backend=args.compile_backend)
            offline.compile(backend=args.compile_backend)
        if env.world_size > 1:  # each rank keeps its BatchNorm statistics: no buffers broadcast in forward
            self.trained = DDP(online, device_ids=[device.index] if device.type == "cuda" else None,
                               gradient_as_bucket_view=True, **NO_FORWARD_BUFFER_SYNC)
        offline.train()
        self.last_saved = self.step
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # read only when logging or saving
        self.loss_sum = torch.zeros((), device=device)  # since the last log line
        self.keys = None  # the last enqueued keys, whose RankMe the log shows
        self.skips = runtime.SkippedImages(log)
        self.tic, self.data_time, self.logged_step = time.perf_counter(), 0.0, self.step
        self.captured = None  # --cuda-graph: the CapturedStep that takes over optimizer_step
        if args.cuda_graph:
            why = capture_refusal(args, env)
            if why:
                log.print(f"--cuda-graph: {why}; this run goes on uncaptured.")
            else:
                self.captured = CapturedStep(self)

    def state(self):
        """The checkpoint (spec section 8)."""
        cuda = self.env.device.type == "cuda"
        return runtime.checkpoint_state(
            "mdra", self.args, self.step, self.steps_per_epoch, self.width, self.online.encoder.backbone,
            self.optimizer, self.scaler, self.info, self.data, self.batchnorm_batch,
            online=self.online.state_dict(), offline=self.offline.state_dict(), queue=self.queue.cpu(),
            queue_ptr=self.queue_ptr if self.captured is None else self.captured.queue_ptr(),
            epoch_loss=self.epoch_loss, rng={"torch": torch.get_rng_state(),
                 **({"cuda": torch.cuda.get_rng_state(self.env.device)} if cuda else {})})

    def restore(self, path):
        """Resume from the checkpoint at path; returns its step."""
        defaults = vars(get_parser().parse_args([]))
        ckpt = runtime.load_resume_checkpoint(path, self.args, RESUME_MAY_CHANGE, defaults, data=self.data,
                                              needs=("online", "offline", "queue", "queue_ptr"))
        runtime.require_same_batchnorm_batch(ckpt, self.batchnorm_batch, path)
        step = runtime.restore_checkpoint(ckpt, path, {"online": (self.online, "the online network"),
                                                        "offline": (self.offline, "the offline network")},
                                          self.optimizer, self.scaler)
        self.queue.copy_(ckpt["queue"])
        self.queue_ptr = int(ckpt["queue_ptr"])
        epoch_loss = ckpt.get("epoch_loss")  # None in checkpoints from before it was kept: the mean of the steps to come
        self.epoch_loss_sum.fill_(epoch_loss["sum"] if epoch_loss else 0.0)  # on every rank: summed, it is added once
        self.epoch_loss_from = epoch_loss["from"] if epoch_loss else step
        self.log.print(f"resumed from {path} at step {step}")
        return step

    def check_finite(self, since):
        runtime.raise_if_nonfinite(self.nonfinite, since, self.step, self.ckpt_path, "mdra.py")

    def save(self, keep_epoch=None):
        """Write the checkpoint (rank 0), and with keep_epoch a copy that stays; never after a non-finite loss."""
        self.check_finite(self.last_saved)
        self.last_saved = self.step
        self.epoch_loss = {"sum": (runtime.all_reduce(self.epoch_loss_sum.clone()) / self.env.world_size).item(),
                           "from": self.epoch_loss_from}  # every rank's steps, as train_one_epoch averages them

        def write():
            state = self.state()
            runtime.save_checkpoint(state, self.ckpt_path)
            if keep_epoch is not None:
                runtime.save_checkpoint(state, self.ckpt_path.with_name(f"checkpoint_epoch{keep_epoch:04d}.pth"))
        runtime.on_main_rank(self.env, "write the checkpoint", write)

    def optimizer_step(self, batches):
        """One optimizer step over args.accum_steps micro-batches; the offline encoder moves once, after it.
        Its loss is added to loss_sum and epoch_loss_sum, on the device."""
        if self.captured is not None:
            return self.captured.optimizer_step(batches)
        args, device = self.args, self.env.device
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr_schedule[self.step])
        for micro in range(args.accum_steps):
            t0 = time.perf_counter()
            *views, skipped, unread = next(batches)
            self.data_time += time.perf_counter() - t0
            self.skips.add(skipped, unread)
            v1, v2, *offline_views = (v.to(device, non_blocking=True, memory_format=self.memory_format) for v in views)
            loss, self.keys, self.queue_ptr = micro_step(self.trained, self.offline, self.queue, self.queue_ptr, v1, v2,
                                                         args, self.autocast, self.scaler,
                                                         sync_grads=micro == args.accum_steps - 1,
                                                         offline_views=offline_views)
            self.nonfinite |= ~torch.isfinite(loss)
            self.loss_sum += loss / args.accum_steps
            self.epoch_loss_sum += loss / args.accum_steps
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update(self.online, self.offline, args.momentum)
        self.step += 1

    def log_step(self, epoch):
        """The log line and record of the steps since the last one (a host sync: only every --log-every)."""
        self.check_finite(self.logged_step)
        args, step = self.args, self.step
        elapsed, steps = time.perf_counter() - self.tic, step - self.logged_step
        erank = effective_rank(self.keys).item()
        record = {"epoch": epoch + 1, "step": step,
                  "loss": (runtime.all_reduce(self.loss_sum.clone()) / self.env.world_size / steps).item(),
                  "lr": float(self.lr_schedule[step - 1]), "ema_momentum": args.momentum,
                  "pairs_per_s": steps * self.batch_images / elapsed, "data_wait": self.data_time / elapsed,
                  "rankme": erank, "eta_s": elapsed / steps * (self.last_step - step),
                  "peak_mem_gb": runtime.peak_memory_gb(self.env.device), "skipped_images": self.skips.total}
        self.log.print(f"epoch {epoch + 1}/{args.epochs} step {step}/{self.total_steps} loss {record['loss']:.4f} "
                       f"lr {record['lr']:.4g} m {args.momentum:.4f} {record['pairs_per_s']:.0f} pairs/s "
                       f"data {100 * record['data_wait']:.0f}% rankme {erank:.1f}/{min(EMBED_DIM, self.keys.shape[0])} "
                       f"eta {datetime.timedelta(seconds=round(record['eta_s']))} mem {record['peak_mem_gb']:.2f}G"
                       + (f" skipped {self.skips.total}" if self.skips.total else ""))
        self.log.json(record)
        self.loss_sum.zero_()
        self.tic, self.data_time, self.logged_step = time.perf_counter(), 0.0, step


def capture_refusal(args, env):
    """Why --cuda-graph cannot capture this run's step, or None."""
    if env.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if env.world_size > 1:
        return "DDP's gradient all-reduce is not captured"
    if args.amp == "fp16":
        return "fp16's loss scaling decides on the host whether to step"
    if args.compile and args.compile_backend == "cudagraphs":
        return "the cudagraphs compile backend captures graphs of its own"
    if args.offline_view == "weak":
        return "its input buffers hold two views, and --offline-view weak gives the offline encoder two more"
    return None


class CapturedStep:
    """--cuda-graph: Pretraining's micro-step and optimizer step, each captured once as a CUDA graph after
    a few eager steps and then replayed, one launch each instead of thousands of small kernels.

    The step computes what Pretraining.optimizer_step computes, in the same order (to float rounding: LARS
    multiplies by the lr tensor, then subtracts, where the plain step adds with alpha); what a graph needs is
    that everything it reads or changes lives on the device at a fixed address, and that nothing in it
    waits for the host:
    - each micro-batch's views are copied into static input buffers;
    - the learning rate is a device tensor that LARS reads, filled from the schedule before each step (the
      groups' lr is set as well, for the checkpoint);
    - the queue is written at a device slot (in global micro-batches) that the step advances;
    - gradients are zeroed in place rather than freed, so that backward adds into the same tensors;
    - BatchNorm counts its batches in place, and the loss sums and the non-finite flag are added to in place.
    The eager steps run these same functions: they make LARS's momentum buffers and the gradients, let
    cuDNN choose its algorithms (and torch.compile compile), on a side stream, as PyTorch's CUDA-graph
    documentation recommends.
    """

    EAGER_STEPS = 3

    def __init__(self, run, eager_steps=EAGER_STEPS):
        self.run, args, device = run, run.args, run.env.device
        self.eager_steps = self.eager_steps_left = eager_steps
        self.lr = torch.zeros((), device=device)
        self.slot = torch.tensor(run.queue_ptr // args.batch_size, device=device)
        self.slots = args.queue_size // args.batch_size
        amp_dtype = runtime.AMP_DTYPES[args.amp]  # a graph replays casts: autocast must not cache them
        self.autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None,
                                       cache_enabled=False)
        self.v1 = self.v2 = None  # the static inputs, made at the first micro-batch
        self.graphs = None        # (micro-step, optimizer step) once captured
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def queue_ptr(self):
        """The queue pointer as Pretraining keeps it (a host sync: only when saving)."""
        return int(self.slot) * self.run.args.batch_size

    def micro_step(self):
        """micro_step on the static inputs: both branches, the loss, its backward, the queue update."""
        run, args = self.run, self.run.args
        with self.autocast:
            q1, q2 = run.online(self.v1, self.v2)
            with torch.no_grad():
                k1, k2 = run.offline.both(self.v1, self.v2)
        loss = mdra_loss(q1, q2, k1, k2, run.queue, args.groups, args.tau, args.mu, args.sinkhorn_iters,
                         cross=args.cross)
        (loss / args.accum_steps).backward()
        with torch.no_grad():
            keys = normalize_subspaces(k1.to(run.queue.dtype), args.groups).flatten(1)
            run.queue.view(self.slots, *keys.shape).index_copy_(0, self.slot.view(1), keys[None])
            self.slot.add_(1).remainder_(self.slots)
            loss = loss.detach()
            run.nonfinite |= ~torch.isfinite(loss)
            run.loss_sum += loss / args.accum_steps
            run.epoch_loss_sum += loss / args.accum_steps
        self.keys = keys

    def update(self):
        """The optimizer step after the micro-steps: LARS, gradients zeroed in place, the EMA."""
        run = self.run
        run.optimizer.step(lr=self.lr)
        torch._foreach_zero_([p.grad for p in run.online.parameters() if p.grad is not None])
        ema_update(run.online, run.offline, run.args.momentum)

    def optimizer_step(self, batches):
        """Pretraining.optimizer_step: eager for the first steps, then replayed."""
        run, args = self.run, self.run.args
        lr = float(run.lr_schedule[run.step])
        self.lr.fill_(lr)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        for _ in range(args.accum_steps):
            t0 = time.perf_counter()
            v1, v2, skipped, unread = next(batches)
            run.data_time += time.perf_counter() - t0
            run.skips.add(skipped, unread)
            if self.v1 is None:
                self.v1 = torch.empty_like(v1, device=run.env.device, memory_format=run.memory_format)
                self.v2 = torch.empty_like(v2, device=run.env.device, memory_format=run.memory_format)
            self.v1.copy_(v1, non_blocking=True)
            self.v2.copy_(v2, non_blocking=True)
            self.run_part(0, self.micro_step)
        self.run_part(1, self.update)
        run.keys = self.keys
        run.step += 1
        if self.graphs is None:
            self.eager_steps_left -= 1
            if self.eager_steps_left == 0 and self.side is not None:
                self.capture()

    def run_part(self, index, eager):
        """Replay graph index once captured; before, run eager() (on the side stream on CUDA)."""
        if self.graphs is not None:
            self.graphs[index].replay()
        elif self.side is None:
            eager()
        else:
            current = torch.cuda.current_stream(self.run.env.device)
            self.side.wait_stream(current)
            with torch.cuda.stream(self.side):
                eager()
            current.wait_stream(self.side)  # before the static inputs are written again

    def capture(self):
        """Record the two graphs; nothing runs, so the state is that of the last eager step."""
        micro, update = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread may call CUDA meanwhile (it launches no device work);
        # the --gpu-aug prefetch thread, which does, waits for the lock until both graphs are captured.
        with runtime.DEVICE_WORK_LOCK:
            with torch.cuda.graph(micro, stream=self.side, capture_error_mode="thread_local"):
                self.micro_step()
            with torch.cuda.graph(update, pool=micro.pool(), stream=self.side, capture_error_mode="thread_local"):
                self.update()
        self.graphs = micro, update
        self.run.log.print(f"--cuda-graph: the micro-step and the optimizer step are captured after "
                           f"{self.eager_steps} eager steps, and replayed from step {self.run.step + 1}")


def train_one_epoch(run, batches, epoch, control):
    """The epoch's optimizer steps from run.step on; returns its mean loss, or None if --max-steps ended
    the run inside it. A stop signal saves and exits after the current step; after the epoch's last step,
    end_epoch does, once the epoch is saved (and kept), monitored and logged, which a resumed run would skip."""
    args, end = run.args, (epoch + 1) * run.steps_per_epoch
    if run.step == epoch * run.steps_per_epoch:  # not resumed inside the epoch, whose loss so far is restored
        run.epoch_loss_sum.zero_()
        run.epoch_loss_from = run.step
    try:
        while run.step < min(run.last_step, end):
            run.optimizer_step(batches)
            if run.step % args.log_every == 0 or run.step == run.last_step:
                run.log_step(epoch)
            if run.step < end:
                runtime.exit_if_stop_requested(control, run.save, run.log, run.step, run.ckpt_path)
            if run.step % args.save_every == 0:
                run.save()
    finally:  # --gpu-aug's prefetch thread stops also when an error or a stop signal ends the epoch
        batches.close()
    if run.step < end:
        return None
    steps = run.step - run.epoch_loss_from
    return (runtime.all_reduce(run.epoch_loss_sum.clone()) / run.env.world_size / steps).item()


def end_epoch(run, epoch, loss, seconds, control):
    """After an epoch: save (a copy every --keep-every epochs), then the kNN monitor every --knn-every,
    then the epoch's record."""
    args, env = run.args, run.env
    record = {"event": "epoch", "epoch": epoch + 1, "step": run.step, "loss": loss, "time_s": seconds,
              "skipped_images": run.skips.total}
    keep = args.keep_every > 0 and (epoch + 1) % args.keep_every == 0
    if keep or run.last_saved != run.step:  # before the kNN monitor, which a time limit may cut short
        run.save(keep_epoch=epoch + 1 if keep else None)
    if args.knn_every and (epoch + 1) % args.knn_every == 0:
        backbone = run.online.encoder.backbone
        if env.world_size > 1:
            runtime.broadcast_buffers(backbone)
        tic = time.perf_counter()
        cuda = env.device.type == "cuda"
        with torch.random.fork_rng(devices=[env.device] if cuda else []):  # leaves training's randomness untouched
            record["knn"] = knn_monitor(backbone, args, env)
        run.tic += time.perf_counter() - tic  # the next log line's speed and eta leave the monitor out
        run.log.print(f"epoch {epoch + 1} kNN " + " ".join(f"{k} {v:.2f}" for k, v in record["knn"].items()))
    run.log.json(record)
    # a signal during the epoch's last step or the monitor
    runtime.exit_if_stop_requested(control, run.save, run.log, run.step, run.ckpt_path)


def train(args):
    env = runtime.setup_distributed(args.device)
    out_dir = Path(args.out_dir)
    runtime.require_folder(out_dir, "--out-dir")
    runtime.on_main_rank(env, f"take --out-dir {out_dir}", runtime.lock_folder, out_dir, "--out-dir")
    images, info = build_dataset(args.data, args.data_dir, "pretrain", args.synthetic_size, args.img_size or 32)
    args = resolve_args(args, info, env)
    if args.knn_every:  # the monitor needs the val split and labels: fail now rather than after the first epoch
        build_dataset(args.data, args.data_dir, "val", args.synthetic_size, args.img_size)
        runtime.require_two_classes(info.num_classes, args.data, "--knn-every's kNN monitor",
                                    " (pretraining itself needs no labels: leave --knn-every out)")
    log = runtime.Logger(out_dir, env.is_main)
    run = Pretraining(args, env, images, info, log)
    runtime.read_image(images, 0)  # here, not in a loader worker: a data set with no readable image is one clear error
    loader, sampler, device_views = pretrain_loader(images, info, args, env, run.steps_per_epoch * args.accum_steps)
    control = env.control  # a CPU channel for the stop flag (None in one process)
    runtime.announce(log, "mdra.py", env, args, step=run.step)
    log.print(f"{len(images)} images, {run.steps_per_epoch} optimizer steps per epoch of {run.batch_images} images, "
              f"lr {args.lr * run.batch_images / 256:.4g} after {args.warmup_epochs:g} warm-up epochs")
    if hasattr(loader, "summary"):  # a gpu_aug.ResidentImages says where it holds the images
        log.print(loader.summary())

    runtime.defer_stop_signals()
    for epoch in range(run.step // run.steps_per_epoch, args.epochs):
        if run.step >= run.last_step:
            break
        start_batch = (run.step % run.steps_per_epoch) * args.accum_steps
        sampler.set_epoch(epoch, start_batch=start_batch)
        tic = time.perf_counter()
        loss = train_one_epoch(run, epoch_batches(loader, device_views, epoch, start_batch), epoch, control)
        if loss is None:  # --max-steps ended the run inside this epoch
            break
        end_epoch(run, epoch, loss, time.perf_counter() - tic, control)

    if run.last_saved != run.step:
        run.save()
    log.print(f"done: {run.step} optimizer steps; checkpoint: {run.ckpt_path.resolve()}")
    if env.is_main:  # from log.jsonl, so that the steps before a resume count too
        for line in closing_lines(logged_steps(log.path), min(EMBED_DIM, args.batch_size), run.ckpt_path, args.data,
                                  run.step / run.steps_per_epoch, run.steps_per_epoch * run.batch_images):
            log.print(line)
    return run.ckpt_path


# ------------------------------------------------------------------------------------------------
# The kNN monitor (--knn-every, spec section 7)
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def monitor_datasets(data, data_dir, synthetic_size, img_size):
    """Built once per run: listing an ImageFolder of a million files takes a while."""
    bank_images, info = build_dataset(data, data_dir, "train", synthetic_size, img_size)
    query_images, _ = build_dataset(data, data_dir, "val", synthetic_size, img_size)
    return bank_images, query_images, info


def knn_monitor(backbone, args, env):
    """Weighted kNN (k = 20, or the bank size if smaller) of the backbone during pretraining:
    {"top1@20": %, "top5@20": %}.

    args: mdra.py's resolved arguments (data, data_dir, synthetic_size, img_size, knn_subset,
    batch_size, workers, amp, channels_last, seed); env: its runtime.DistEnv. Every rank must call it.
    The bank is --knn-subset train images (a subset seeded by --seed, or all) kept in host memory, so
    it never competes with training for GPU memory. The backbone runs in eval mode (BatchNorm running
    statistics, which it therefore does not update) and gets its modes back; nothing here draws from
    the global random generators, so training continues exactly as without the monitor.
    """
    bank_images, query_images, info = monitor_datasets(args.data, args.data_dir, args.synthetic_size, args.img_size)
    bank_indices = knn.bank_subset(len(bank_images), args.knn_subset, args.seed)
    k = min(knn.MONITOR_K, len(bank_indices))  # a monitor must not end a training run over a tiny bank
    query_indices = torch.arange(len(query_images))[knn.shard(len(query_images), env)]
    transform = eval_transform(info, args.img_size)
    extract = functools.partial(knn.extract_features, backbone, env=env,
                                batch_size=max(1, args.batch_size // env.world_size), workers=args.workers,
                                amp=args.amp, channels_last=args.channels_last)
    modes = [(module, module.training) for module in backbone.modules()]
    backbone.eval()
    try:
        bank_shard = bank_indices[knn.shard(len(bank_indices), env)].tolist()
        bank = knn.gather_rows(extract(CentreCrops(Subset(bank_images, bank_shard), transform), out_device="cpu"), env)
        queries = extract(CentreCrops(Subset(query_images, query_indices.tolist()), transform), out_device=env.device)
    finally:
        for module, training in modes:
            module.training = training
    bank_labels = torch.tensor(bank_images.targets)[bank_indices]
    query_labels = torch.tensor(query_images.targets)[query_indices]
    (top1, top5), = knn.knn_accuracy(bank, bank_labels, queries, query_labels, info.num_classes, [k],
                                     0.07, knn.DEFAULT_CHUNK_MB, env).values()
    return {f"top1@{k}": top1, f"top5@{k}": top5}


# ------------------------------------------------------------------------------------------------
# What a run shows: its closing lines
# ------------------------------------------------------------------------------------------------

SUMMARY_POINTS = 3  # log points averaged at each end of the run, so that one batch's noise does not decide
COLLAPSED_RANK = 0.1  # RankMe below this share of its maximum: the embedding is collapsing (towards rank 1)
# The run that shows learning on Fashion-MNIST, as measured (README, "Results on Fashion-MNIST": 8.3 s
# per epoch on one H100, plus four kNN evaluations), and kNN top-1 at k = 20 with the whole training
# set as the bank: after the quick start's 30 steps, untrained, and after that run.
LEARNING_EPOCHS, LEARNING_TIME = 80, "about 12 minutes on one H100"
LEARNING_COMMAND = ("python3 mdra.py --data fashion-mnist --arch resnet18 --epochs 80 --warmup-epochs 4 "
                    "--knn-every 20 --workers 15 --no-compile --out-dir runs/fm80")
KNN_QUICK_START, KNN_UNTRAINED, KNN_LEARNT = 76.27, 81.55, 87.56


def logged_steps(path):
    """The step records of log.jsonl behind the weights a run ends with, in step order. A run's start
    record names the step it began at: a fresh run (step 0) drops what an earlier run left in the
    folder, and a resumed one the steps logged after the checkpoint it resumed from."""
    lines = Path(path).read_text().splitlines() if Path(path).is_file() else []
    records = {}
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short when a run was killed
            continue
        if record.get("event") == "start":  # logs written before start records named a step keep everything
            records = {step: r for step, r in records.items() if step <= record.get("step", math.inf)}
        elif "event" not in record:
            records[record["step"]] = record
    return [records[step] for step in sorted(records)]


def closing_lines(records, rank_max, ckpt_path, data, epochs, images_per_epoch):
    """What the run's loss and RankMe show, and what they do not: the first SUMMARY_POINTS log points
    against the last ones. epochs: the epochs trained (a fraction after --max-steps)."""
    n = min(SUMMARY_POINTS, len(records) // 2)
    if n == 0:
        return [f"{len(records)} log point(s), too few to compare the start with the end: log more often (--log-every)."]
    first, last = records[:n], records[-n:]

    def mean(part, key):
        return sum(r[key] for r in part) / n

    loss, rank = (mean(first, "loss"), mean(last, "loss")), (mean(first, "rankme"), mean(last, "rankme"))
    lines = [f"steps {first[0]['step']}-{first[-1]['step']} against {last[0]['step']}-{last[-1]['step']} "
             f"(means of {n} log points): loss {loss[0]:.4f} -> {loss[1]:.4f}, "
             f"RankMe {rank[0]:.1f} -> {rank[1]:.1f} of {rank_max}",
             ("The loss fell: the objective is being optimised; " if loss[1] < loss[0] else
              "The loss did not fall: the objective is not (yet) being optimised; ") +
             ("RankMe is far from 1: the embedding has not collapsed." if rank[1] >= COLLAPSED_RANK * rank_max else
              f"RankMe is below {COLLAPSED_RANK:.0%} of its maximum: the embedding is collapsing."),
             "Neither shows that the features are useful; a kNN against the same network untrained does: "
             f"python3 eval_knn.py --ckpt {shlex.quote(str(ckpt_path))}, then the same with --random-init."]
    if data == "fashion-mnist" and epochs < LEARNING_EPOCHS:
        rate = sum(r["pairs_per_s"] for r in last) / n
        hours = LEARNING_EPOCHS * images_per_epoch / rate / 3600
        lines.append(f"A run this short is not expected to beat it (the quick start's 30 steps: kNN top-1 "
                     f"{KNN_QUICK_START}%, untrained {KNN_UNTRAINED}%); {LEARNING_EPOCHS} epochs reach {KNN_LEARNT}%, "
                     f"{LEARNING_TIME} or {hours:.0f} hours at this run's {rate:.0f} pairs/s: {LEARNING_COMMAND}")
    return lines


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

# The sentence of every script's --img-size help that names the minimum.
IMG_SIZE_MINIMUM = (f"At least {min_img_size(small_stem=True)} px ({min_img_size(small_stem=False)} with the ImageNet "
                    "stem), the factor by which the network downsamples.")


def crop_size(text):
    """argparse type of --img-size: at least the small stem's minimum; the ImageNet stem's is checked
    once the stem is known (require_img_size)."""
    value, least = int(text), min_img_size(small_stem=True)
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} px is below {least}, the smallest crop a ResNet here can process: "
                                         f"even with the small stem it downsamples {least}x")
    return value


def add_network_flags(parser, from_checkpoint=False, small_stem=True):
    """--arch, --img-size and (with small_stem) --small-stem, as every script takes them; from_checkpoint:
    they default to the checkpoint's (the downstream scripts), else to the pretraining defaults."""
    a = parser.add_argument
    a("--arch", default=None if from_checkpoint else "resnet50",
      help="any torchvision ResNet, e.g. resnet18, resnet50, wide_resnet50_2"
           + ("; default: the checkpoint's, else resnet50" if from_checkpoint else ""))
    a("--img-size", type=crop_size, default=None,
      help="crop size; default: " + ("the checkpoint's, else " if from_checkpoint else "")
           + "the data set's native size (224 for an ImageFolder). " + IMG_SIZE_MINIMUM)
    if small_stem:
        a("--small-stem", action=argparse.BooleanOptionalAction, default=None,
          help="3x3 stride-1 stem without max-pool; default: " + ("the checkpoint's, else " if from_checkpoint else "")
               + "on for small data sets and images <= 64 px")


def get_parser():
    p = argparse.ArgumentParser(
        prog="mdra.py", formatter_class=runtime.HelpFormatter,
        description="MDRA self-supervised pretraining. The defaults are the patent's ImageNet run once --data "
                    "names ImageNet; without --data, Fashion-MNIST with the small-data preset (the quick start).")
    a = p.add_argument
    a("--epochs", type=int, default=200, help="length of the schedule")
    a("--batch-size", type=int, default=None,
      help="global micro-batch over all ranks; default 512 (ImageNet) or 256 (small data)")
    a("--accum-steps", type=int, default=None,
      help="micro-batches per optimizer step; default 8 (ImageNet: 512 x 8 = 4096) or 1 (small data)")
    a("--lr", type=runtime.finite_float, default=0.3,
      help="LARS learning rate per 256 images; scaled by batch x accumulation / 256")
    a("--weight-decay", type=runtime.finite_float, default=1e-6, help="LARS weight decay (not on biases and BatchNorm)")
    a("--warmup-epochs", type=runtime.finite_float, default=10, help="linear warm-up before the cosine decay")
    a("--queue-size", type=int, default=None, help="N negatives; default 65536 (ImageNet) or 4096 (small data)")
    a("--groups", type=int, default=4,
      help="G subspaces; must divide 256. 1 is an ablation: plain relation alignment (without spec section 4)")
    a("--tau", type=runtime.finite_float, default=0.04, help="temperature of the online relation P")
    a("--mu", type=runtime.finite_float, default=0.05, help="temperature of the Sinkhorn (offline) relation R")
    a("--momentum", type=runtime.finite_float, default=0.99, help="EMA momentum m of the offline encoder")
    a("--sinkhorn-iters", type=int, default=3,
      help="Sinkhorn-Knopp iterations; 0 is an ablation without the balance constraint (spec section 3): "
           "R is a plain row softmax of K/mu, as in ReSSL")
    a("--predictor", action=argparse.BooleanOptionalAction, default=True,
      help="the online predictor h (spec sections 2-3); --no-predictor is an ablation: q = g(f(v))")
    a("--cross", action=argparse.BooleanOptionalAction, default=True,
      help="cross alignment (spec section 3): each view's online relation is pulled towards the other view's "
           "offline one; --no-cross is an ablation that pulls it towards its own view's")
    a("--offline-view", choices=["same", "weak"], default="same",
      help="what the offline encoder sees: same, the online encoder's two views (spec section 3); weak, two views "
           "of its own, cropped and flipped as the others but not coloured, greyed, blurred or solarized: ReSSL's "
           "weaker teacher view, a small-data trial")
    a("--solarize", type=runtime.finite_float, default=0.0,
      help="probability of solarizing view 2 (off in the patent's recipe)")
    a("--gpu-aug", action=argparse.BooleanOptionalAction, default=False,
      help="decode JPEGs and augment on the device, in batches (gpu_aug.py): use when the CPU loader cannot keep "
           "up. An in-memory data set (" + ", ".join(SMALL_DATASETS) + ") is then held on the device as uint8 and "
           "each micro-batch gathered there, without loader workers. Off until a GPU measurement shows it faster")
    a("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
      help="SyncBatchNorm across ranks; default: on with more than one CUDA rank")
    a("--one-pass", action=argparse.BooleanOptionalAction, default=False,
      help="each encoder runs both views as one batch of 2B, its BatchNorm layers still normalising each view "
           "alone: the same outputs, gradients and running statistics as two passes, to float rounding. Off "
           "until a GPU measurement shows it faster")
    a("--cuda-graph", action=argparse.BooleanOptionalAction, default=False,
      help="capture the micro-step and the optimizer step as CUDA graphs after 3 eager steps and replay them: one "
           "launch each instead of thousands of small kernels, the same computation to float rounding. CUDA only, one "
           "process, bf16 or fp32; elsewhere the run says why and goes on uncaptured. Off until a GPU measurement "
           "shows it faster")
    a("--keep-every", type=int, default=50, help="keep a copy checkpoint_epochNNNN.pth every this many epochs (0: never)")
    a("--knn-every", type=int, default=0, help="weighted-kNN evaluation every this many epochs (0: never)")
    a("--knn-subset", type=int, default=0, help="number of training images in the kNN bank (0: all)")
    add_network_flags(p)
    runtime.add_shared_flags(p, SMALL_DATASETS, out_dir="runs/mdra")
    return p


def resolve_args(args, info, env):
    """Fill the data-dependent defaults (spec section 6) and check what cannot work."""
    small = info.small
    defaults = {"img_size": info.native_size, "batch_size": 256 if small else 512, "accum_steps": 1 if small else 8,
                "queue_size": 4096 if small else 65536}
    for name, value in defaults.items():
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    if args.small_stem is None:
        args.small_stem = small or args.img_size <= 64
    cuda = env.device.type == "cuda"
    runtime.resolve_speed_flags(args, env)
    args.sync_bn = (cuda and env.world_size > 1) if args.sync_bn is None else args.sync_bn
    require_img_size(args.img_size, args.small_stem)
    runtime.require_at_least(1, args, "epochs", "batch_size", "accum_steps", "queue_size", "groups",
                             "log_every", "save_every")
    runtime.require_at_least(0, args, "max_steps", "workers", "keep_every", "knn_every", "knn_subset", "warmup_epochs",
                             "lr", "weight_decay", "sinkhorn_iters")
    for name in ("tau", "mu"):
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name} {getattr(args, name)} must be positive.")
    for name in ("momentum", "solarize"):
        if not 0 <= getattr(args, name) <= 1:
            raise UsageError(f"--{name} {getattr(args, name)} is not in [0, 1].")
    if EMBED_DIM % args.groups:
        raise UsageError(f"--groups {args.groups} does not divide the embedding dimension {EMBED_DIM}.")
    if args.batch_size % env.world_size:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the world size {env.world_size}.")
    if args.queue_size % args.batch_size:
        raise UsageError(f"--queue-size {args.queue_size} is not a multiple of the global batch {args.batch_size}.")
    if args.sync_bn and env.world_size > 1 and not cuda:
        raise UsageError("--sync-bn needs CUDA: SyncBatchNorm cannot synchronise ranks on the CPU.")
    return args


def require_img_size(img_size, small_stem):
    """One clear error for a crop the backbone would shrink to padding (min_img_size)."""
    least = min_img_size(small_stem)
    if img_size < least:
        raise UsageError(f"--img-size {img_size} is below {least}, the smallest crop the "
                         f"{'small' if small_stem else 'ImageNet'} stem's network can process (it downsamples "
                         f"{least}x){'' if small_stem else '; use the small stem or a larger crop'}.")


def main(argv=None):
    return runtime.run_main(train, argv, get_parser(),
                            memory_flags="--batch-size (raise --accum-steps to keep the batch), --img-size or "
                                         "--queue-size")


if __name__ == "__main__":
    main()
