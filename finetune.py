"""MDRA downstream: fine-tuning, linear probe, and the image classifier they make (patent steps 5-7).

Step 5 puts a new linear layer on the pretrained online backbone f; step 6 fine-tunes that network
with cross-entropy on a small labelled subset (the field's 1% / 10% protocols) and reports top-1 and
top-5 on the full validation split after every epoch; step 7 classifies image files, here with
--predict or anywhere after --export (MDRA_SPEC.md sections 7-8).

Launch:
    python finetune.py --ckpt runs/mdra/checkpoint.pth --data fashion-mnist --label-fraction 0.01 \\
        --out-dir runs/ft-1pct                                            # 1% of the labels, one process
    torchrun --nproc_per_node=8 finetune.py --ckpt runs/mdra/checkpoint.pth --data /path/to/imagenet \\
        --subset-file 1percent.txt --out-dir runs/ft-1pct                 # the patent's ImageNet 1% run
    python finetune.py --ckpt runs/mdra/checkpoint.pth --linear --data fashion-mnist --out-dir runs/linear
    python finetune.py --random-init --arch resnet18 --data fashion-mnist --label-fraction 0.01 \\
        --out-dir runs/scratch-1pct                                       # the supervised baseline
    python finetune.py --ckpt runs/ft-1pct/checkpoint.pth --export classifier.pt2   # or .pt: TorchScript
    python finetune.py --ckpt runs/ft-1pct/checkpoint.pth --predict photo.png more_photos/

Starting again with the same --out-dir resumes from <out-dir>/checkpoint.pth; left out, the flags whose
defaults come from the data or the checkpoint keep its values. --export and --predict take a fine-tuned
checkpoint as it is (a pretraining one must be fine-tuned first), or the one --random-init training writes.
"""
import argparse
import datetime
import json
import math
import os
import shlex
import sys
import time
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T

import data
import mdra
import runtime
from runtime import UsageError

CLASSIFIER_FORMAT = "mdra-classifier"
# What a resumed run may change besides runtime.RUN_FLAGS (as mdra.RESUME_MAY_CHANGE): how often it
# evaluates, and what it does with the classifier afterwards.
RESUME_MAY_CHANGE = runtime.RUN_FLAGS + ("eval_every", "export", "predict")
# What --export and --predict of a fine-tuned classifier use; any other flag would have no effect there.
CLASSIFY_USES = ("ckpt", "export", "predict", "device", "batch_size", "workers")
# The patent's rate is for ImageNet's 1000 classes; on 10 it diverges (docs/finetuning.md, "Choosing the
# learning rate"), and held-out trials on Fashion-MNIST chose 0.03, the default for the named small data sets.
PATENT_LR, SMALL_DATA_LR = 0.3, 0.03


# ------------------------------------------------------------------------------------------------
# The image-classification network (patent step 5)
# ------------------------------------------------------------------------------------------------

class Classifier(nn.Module):
    """Backbone f and a new linear layer. The data set's normalisation is inside, so the network
    takes float32 images [N, 3, H, W] in [0, 1] as they come from a file, and nothing else: the exported
    model needs no other code, and refuses uint8 pixels in 0-255 (they would give saturated
    probabilities) and other shapes rather than broadcast them."""

    def __init__(self, backbone, width, num_classes, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.backbone = backbone
        self.head = nn.Linear(width, num_classes)
        # Near-zero logits at the start (as MoCo v3's linear classifier): the first gradients that
        # reach the pretrained backbone are small.
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, images):
        """images: float32 [N, 3, H, W] in [0, 1] -> logits [N, num_classes]."""
        if images.dtype != torch.float32 or images.dim() != 4 or images.shape[1] != 3:
            dtype = "float32" if images.dtype == torch.float32 else "not float32"  # TorchScript prints dtypes as numbers
            raise ValueError("the classifier takes float32 images in [0, 1] shaped [N, 3, H, W] (RGB pixels / 255); "
                             f"this input is {dtype}, shaped {list(images.shape)}.")
        # torch.export keeps ops, not Python: in a .pt2 this op checks the dtype, and torch.export's own
        # input guards the shape (with their own messages).
        torch._assert_tensor_metadata(images, dtype=torch.float32)
        return self.head(self.backbone((images - self.mean) / self.std))


CLASSIFIER_KEYS = (*runtime.BACKBONE_KEYS, "head", "num_classes", "class_names", "mean", "std", "img_size", "resize")


def load_classifier(ckpt, path):
    """The fine-tuned network of a classifier checkpoint, in eval mode."""
    runtime.require_keys(ckpt, path, CLASSIFIER_KEYS, "finetune.py")
    least = mdra.min_img_size(ckpt["small_stem"])  # load_checkpoint knows no stems: only that no network takes < 8
    if ckpt["img_size"] < least:
        raise UsageError(f"{path}: img_size is {ckpt['img_size']}, not an integer >= {least}, the smallest crop "
                         "of its network.")
    backbone, width = mdra.build_backbone(ckpt["arch"], ckpt["small_stem"])
    model = Classifier(backbone, width, ckpt["num_classes"], ckpt["mean"], ckpt["std"])
    runtime.load_strict(model.backbone, ckpt["backbone"], f"the backbone in {path}")
    runtime.load_strict(model.head, ckpt["head"], f"the classifier head in {path}")
    return model.eval()


def check_backbone_unchanged(backbone, reference):
    """The linear probe's sanity check (as MoCo v3's): every weight and BatchNorm statistic of the
    frozen backbone is bit-identical to where it started."""
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v.cpu(), reference[k].cpu())]
    if changed:
        raise RuntimeError(f"the linear probe changed the frozen backbone ({len(changed)} tensors, e.g. "
                           f"{', '.join(changed[:3])}); its features were not the pretrained ones.")


# ------------------------------------------------------------------------------------------------
# The labelled subset S2
# ------------------------------------------------------------------------------------------------

def class_balanced_subset(targets, fraction, seed):
    """Sorted indices of fraction * n_c images (rounded half up, at least one) drawn from each class c
    by a seeded generator: every class gives the same share of its images; fraction 1 is the whole set."""
    sizes = torch.bincount(torch.as_tensor(targets)).tolist()
    return data.per_class_draw(targets, [max(1, int(fraction * n + 0.5)) for n in sizes], seed)


def read_subset_file(path, names):
    """Sorted indices of the images a split file names, one per line: a name as the data set gives it
    (an ImageFolder's "class/file", as subset.txt holds them), or a bare file name, as in the ImageNet
    1% / 10% files of SimCLR ("n01440764_10026.JPEG"). names: the data set's .names."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--subset-file {path} does not exist or is not a file.")
    try:  # -sig: a Windows editor's byte-order mark; surrogateescape: names in bytes that are not UTF-8
        text = path.read_text(encoding="utf-8-sig", errors="surrogateescape").removeprefix(SUBSET_HEADER)
    except OSError as e:
        raise UsageError(f"--subset-file {path} cannot be read as text ({type(e).__name__}).") from None
    where = {}
    for index, name in enumerate(names):
        where.setdefault(name, []).append(index)
        if "/" in name:
            where.setdefault(name.rsplit("/", 1)[1], []).append(index)
    # Lines end at "\n" alone (a file name may hold "\f" or "\u2028"); a line is trimmed unless it names an
    # image as it is (a name may start with a space).
    wanted = sorted({line.rstrip() if line.rstrip() in where else line.strip().removeprefix("./")
                     for line in text.split("\n") if line.strip()})
    if not wanted:
        raise UsageError(f"--subset-file {path} names no images.")
    unknown = [name for name in wanted if name not in where]
    if any(0xDC80 <= ord(c) <= 0xDCFF for name in unknown for c in name):  # bytes not UTF-8 that name no image
        raise UsageError(f"--subset-file {path} cannot be read as text (UnicodeDecodeError).")
    if unknown:
        raise UsageError(f"--subset-file {path} names {len(unknown)} images that are not in the training set, "
                         f"e.g. {', '.join(unknown[:3])}.")
    ambiguous = [name for name in wanted if len(where[name]) > 1]
    if ambiguous:
        raise UsageError(f"--subset-file {path} names {len(ambiguous)} images by a file name that occurs more than "
                         f"once in the training set, e.g. {ambiguous[0]}; name them as class/file.")
    return sorted({where[name][0] for name in wanted})  # an image named both ways counts once


SUBSET_HEADER = "# the labelled images of a finetune.py run, one per line; --subset-file reads this file\n"


def write_subset(path, names, subset_file):
    """The labelled images as --subset-file reads them, so that the run can be repeated: as the file system's
    bytes, UTF-8 or not. Over nothing but a subset.txt of this script's (its header, or the same names an
    earlier version wrote), and never over the --subset-file this run reads, which names them already."""
    text = "".join(name + "\n" for name in names).encode("utf-8", "surrogateescape")
    if subset_file and path.exists() and os.path.samefile(path, subset_file) or path.is_file() and (
            path.read_bytes() == text):
        return
    runtime.require_replaceable(path, "--out-dir's", lambda p: p.read_bytes().startswith(SUBSET_HEADER.encode()),
                                "a subset.txt of finetune.py")
    with runtime.atomic_file(path, len(text) + len(SUBSET_HEADER)) as tmp:
        tmp.write_bytes(SUBSET_HEADER.encode() + text)


# ------------------------------------------------------------------------------------------------
# Data: uint8 crops; the device turns them into [0, 1] floats (a quarter of the bytes to copy)
# ------------------------------------------------------------------------------------------------

def train_transform(info, img_size):
    """A random resized crop with the crop scales of mdra.py's pretraining, and a flip, to uint8."""
    return T.Compose([T.RandomResizedCrop(img_size, scale=(0.2, 1.0) if info.small else (0.08, 1.0),
                                          interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.PILToTensor()])


def to_unit_float(images, device, memory_format=torch.contiguous_format):
    return images.to(device, non_blocking=True, memory_format=memory_format).float().div_(255)


class AugmentedSubset(Dataset):
    """Training samples keyed by (epoch, position in the subset), as mdra.TwoViews: each seeds its
    own augmentation, so a sample does not depend on workers, ranks, or whether the run was resumed."""

    def __init__(self, images, transform, seed):
        self.images, self.transform, self.seed = images, transform, seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        epoch, position = key
        image, label, skipped = data.read_image(self.images, position)
        with data.sample_rng(data.sample_seed(self.seed, epoch, position)):
            return self.transform(image), label, len(skipped), "\n".join(skipped)


class FileHeaders(Dataset):
    """For each file, "" if PIL can open it, else "path: why". Opening reads the header (the format, the
    size, which PIL's pixel limit checks), not the pixels."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(data.regular_file(self.paths[i])):  # a FIFO would make it wait for ever
                return ""
        except data.READ_ERRORS as e:
            return f"{self.paths[i]}: {data.read_error(e)}"


def require_openable(images, indices, workers, env):
    """Every rank raises the same error if any of images[indices] (each rank its own) is a file PIL cannot
    open (none is, for images held in memory). Headers only: decoding ImageNet's 50 000 validation images
    would take minutes before the first epoch, so a file whose pixel data alone is damaged is still found by
    the evaluation."""
    base = images
    while isinstance(base, Subset):
        base = base.dataset
    unreadable = []
    if hasattr(base, "paths"):
        loader = DataLoader(FileHeaders([data.image_path(images, i) for i in indices]), batch_size=256,
                            num_workers=workers, collate_fn=list, worker_init_fn=runtime.ignore_stop_signals)
        unreadable = [why for batch in loader for why in batch if why]
    total = runtime.all_reduce(torch.tensor(len(unreadable), device=env.device)).item()
    if total:
        raise unreadable_evaluation_error(total, unreadable)


def unreadable_evaluation_error(total, unreadable):
    """The error every rank raises when the ranks found total unreadable evaluation images, this one
    the "path: why" lines of unreadable (a name, if this rank has one)."""
    example = f", e.g. {unreadable[0]}" if unreadable else ""
    return UsageError(f"{total} images of the evaluation split cannot be read{example}; "
                      "remove or replace them, then run the same command again.")


@torch.no_grad()
def evaluate(model, loader, device, memory_format, autocast):
    """Top-1 and top-5 accuracy (%) and the number of images. Each rank counts its own share of
    the split and the counts are summed, so every image is counted exactly once. Unreadable images
    are counted too, and any of them makes every rank raise the same error."""
    model.eval()
    hits_sum, total = torch.zeros(2, dtype=torch.long, device=device), 0  # top-1 and top-5 hits, images
    unreadable = []
    for images, labels, failed in loader:
        unreadable += [name for name in failed if name]
        labels = labels.to(device, non_blocking=True)
        with autocast:
            logits = model(to_unit_float(images, device, memory_format))
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        hits_sum += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
        total += len(labels)
    counts = runtime.all_reduce(torch.cat([hits_sum, torch.tensor([total, len(unreadable)], device=device)]))
    top1, top5, total, unreadable_total = counts.tolist()
    if unreadable_total:
        raise unreadable_evaluation_error(unreadable_total, unreadable)
    return 100 * top1 / max(total, 1), 100 * top5 / max(total, 1), total


# ------------------------------------------------------------------------------------------------
# Fine-tuning (patent step 6) and the linear probe
# ------------------------------------------------------------------------------------------------

def resumed_checkpoint(out_dir):
    """The checkpoint of the run that out_dir holds, read once for its settings and its state (under the
    out-dir's lock, so that no run writes it after); None if none."""
    path = Path(out_dir) / "checkpoint.pth"
    return runtime.load_out_dir_checkpoint(path, (CLASSIFIER_FORMAT,), "finetune.py") if path.is_file() else None


def resolve_sources(args, start, resumed):
    """Fill the defaults of the flags left out that come from elsewhere: a resumed run keeps its own
    settings, whatever the defaults are now (resumed: its args); a pretraining checkpoint (start) gives
    its size and, unless --data names another, its data (as eval_knn.py); the learning rate is the
    small data sets' or the patent's."""
    pretrained = {**start.get("args", {})} if start is not None else {}
    if start is not None and "img_size" in start:  # spec section 8 does not promise it: then args' size
        pretrained["img_size"] = start["img_size"]
    if args.data is None:
        args.data = resumed.get("data", pretrained.get("data", runtime.DATA_DEFAULTS["data"]))
    same_data = args.data == pretrained.get("data")
    for name, default in (("data_dir", runtime.DATA_DEFAULTS["data_dir"]), ("img_size", None)):
        if getattr(args, name) is None:
            fallback = pretrained.get(name, default) if same_data or name == "img_size" else default
            setattr(args, name, resumed.get(name, fallback))
    if args.lr is None:
        named = args.data.partition(":")[0] in data.SMALL_DATASETS
        args.lr = resumed.get("lr", SMALL_DATA_LR if named else PATENT_LR)
    return args


def resolve_args(args, info, env, start):
    """Fill the defaults that depend on the checkpoint, data and device; check what cannot work."""
    if start is not None:  # the architecture is the pretrained one
        if args.arch is not None and args.arch != start["arch"]:
            raise UsageError(f"--arch {args.arch} does not match the checkpoint's {start['arch']}; leave it out to "
                             "use the checkpoint's.")
        args.arch = start["arch"]
    args.arch = args.arch or "resnet50"
    args.img_size = args.img_size or info.native_size
    args.small_stem = start["small_stem"] if start is not None else info.small or args.img_size <= 64
    mdra.require_img_size(args.img_size, args.small_stem)
    runtime.resolve_speed_flags(args, env)
    if args.linear and args.lr_backbone is not None:
        raise UsageError("--lr-backbone has no effect with --linear, whose backbone is frozen.")
    if args.batch_size % env.world_size:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the world size {env.world_size}.")
    runtime.require_at_least(1, args, "epochs", "batch_size", "log_every", "save_every", "eval_every")
    runtime.require_at_least(0, args, "lr", "weight_decay", "workers", "max_steps", "holdout")
    if args.lr_backbone is not None:
        runtime.require_at_least(0, args, "lr_backbone")
    return args


def labelled_data(args, env, start):
    """(the training images, the labelled subset's indices in them, the evaluation images and their name,
    what is known of the data, the resolved args): the labelled subset S2 (a --subset-file or a class-
    balanced --label-fraction), evaluated on the validation split or on --holdout training images."""
    drawn_size = args.img_size or 32  # synthetic images are drawn at the size they will be used at
    train_images, info = data.build_dataset(args.data, args.data_dir, "train", drawn_size)
    runtime.require_two_classes(info.num_classes, args.data, "fine-tuning")
    args = resolve_args(args, info, env, start)
    if args.subset_file:
        subset = read_subset_file(args.subset_file, train_images.names)
    else:
        subset = class_balanced_subset(train_images.targets, args.label_fraction or 1.0, args.seed)
    if not args.holdout:
        return train_images, subset, data.build_dataset(args.data, args.data_dir, "val", drawn_size)[0], "val", info, args
    # Evaluated on training images the classifier never sees, not on the validation split.
    if len(subset) == len(train_images):  # all labels: the held-out images leave the labelled set
        held_out = data.held_out_subset(train_images.targets, [], args.holdout, args.seed)
        subset = sorted(set(subset) - set(held_out))
    else:
        held_out = data.held_out_subset(train_images.targets, subset, args.holdout, args.seed)
    return train_images, subset, Subset(train_images, held_out), "held-out", info, args


def build_classifier(args, start, info, device, memory_format):
    """The classifier (patent step 5) on device, its backbone the pretrained one (or random), and its SGD
    optimizer: the backbone's learning rate is --lr-backbone's if given, and it has none when frozen."""
    torch.manual_seed(args.seed)  # the same new head (and random backbone) on every rank
    backbone, width = mdra.build_backbone(args.arch, args.small_stem)
    model = Classifier(backbone, width, info.num_classes, info.mean, info.std)
    if start is not None:
        runtime.load_strict(model.backbone, start["backbone"], f"the backbone in {args.ckpt}")
    if args.linear:
        model.backbone.requires_grad_(False)
    model.to(device, memory_format=memory_format)
    groups = [dict(params=list(model.head.parameters()), lr=args.lr)]
    if not args.linear:
        groups.append(dict(params=list(model.backbone.parameters()),
                           lr=args.lr if args.lr_backbone is None else args.lr_backbone))
    return model, width, torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)


class FineTuning:
    """A fine-tuning (or linear-probe) run in --out-dir, which the caller has locked: the classifier, its
    optimizer, its data and its loop. start: the pretraining checkpoint, or None for --random-init; resumed:
    the checkpoint in --out-dir (resumed_checkpoint), or None for a fresh run."""

    def __init__(self, args, env, start, resumed):
        train_images, subset, eval_images, self.eval_name, self.info, args = labelled_data(args, env, start)
        self.args, self.env, self.start, device = args, env, start, env.device
        self.log, self.ckpt_path = runtime.Logger(args.out_dir, env.is_main), Path(args.out_dir) / "checkpoint.pth"
        self.steps_per_epoch = len(subset) // args.batch_size
        if self.steps_per_epoch == 0:
            raise UsageError(f"the labelled subset has {len(subset)} images, fewer than one batch of "
                             f"{args.batch_size}; lower --batch-size.")
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model, self.width, self.optimizer = build_classifier(args, start, self.info, device, self.memory_format)
        # The cosine's base rates, taken before a resumed optimizer state brings back the last step's rates.
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
        self.fingerprint = runtime.data_fingerprint([train_images.names[i] for i in subset])  # the labelled images
        ckpt = runtime.restart_from_checkpoint(
            self.ckpt_path, args, get_parser(), RESUME_MAY_CHANGE, self.fingerprint, args.batch_size // env.world_size,
            {"backbone": (self.model.backbone, "the backbone"), "head": (self.model.head, "the classifier head")},
            self.optimizer, self.scaler, env, self.log, (CLASSIFIER_FORMAT,), ("metrics",), "finetune.py",
            loaded=resumed)
        self.step, self.metrics = (ckpt["step"], ckpt["metrics"]) if ckpt else (0, {})
        self.progress, self.eval_times, self.warned = runtime.Progress(device, self.step), [], False
        if env.is_main:
            write_subset(Path(args.out_dir) / "subset.txt", [train_images.names[i] for i in subset], args.subset_file)

        labelled = Subset(train_images, subset)
        data.read_image(labelled, 0)  # here, not in a loader worker: a subset with no readable image is one sentence
        self.sampler = data.EpochSampler(len(subset), args.batch_size, self.steps_per_epoch, env.world_size, env.rank,
                                         args.seed)
        self.loader = runtime.data_loader(AugmentedSubset(labelled, train_transform(self.info, args.img_size), args.seed),
                                          args.batch_size // env.world_size, args.workers, device, sampler=self.sampler)
        self.resize = data.eval_resize(self.info, args.img_size)
        val_set = Subset(data.CentreCrops(eval_images, data.eval_transform(args.img_size, self.resize)),
                         range(env.rank, len(eval_images), env.world_size))  # every image on exactly one rank
        self.val_loader = runtime.data_loader(val_set, args.batch_size // env.world_size, args.workers, device)
        self.eval_size = len(eval_images)
        self.eval_epochs = [e for e in range(1, args.epochs + 1) if e % args.eval_every == 0 or e == args.epochs]
        runtime.announce(self.log, "finetune.py", env, args, labelled_images=len(subset))
        self.log.print(
            f"{'linear probe (frozen backbone)' if args.linear else 'fine-tuning'} of {args.arch} from "
            f"{'random initialisation' if start is None else args.ckpt}: {len(subset)} of {len(train_images)} labelled "
            f"images ({100 * len(subset) / len(train_images):.3g}%), {self.steps_per_epoch} steps per epoch of "
            f"{args.batch_size}, {len(eval_images)} " + ("held-out training" if args.holdout else "validation")
            + " images evaluated " + ("after every epoch" if args.eval_every == 1 else f"every {args.eval_every} epochs"))
        require_openable(eval_images, val_set.indices, args.workers, env)  # before the first epoch, not after it

    def run(self):
        """Train to the end (or --max-steps), check the linear probe's frozen backbone; returns the checkpoint."""
        reference = {k: v.clone() for k, v in self.model.backbone.state_dict().items()} if self.args.linear else None
        self.train()
        if self.args.linear:
            check_backbone_unchanged(self.model.backbone, reference)
            self.log.print("linear probe: the backbone is bit-identical to the one it started from")
        metrics = self.metrics
        self.log.print(f"done: {self.step} steps" + (
            f"; {metrics.get('eval', 'val')} top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f} after epoch "
            f"{metrics['epoch']}" if metrics else "") + f"; checkpoint: {self.ckpt_path.resolve()}")
        return self.ckpt_path

    def train(self):
        """The epochs from self.step on: SGD with a cosine per step, a log line every --log-every steps, an
        evaluation every --eval-every epochs and the checkpoint after each epoch."""
        args, env, device, model_raw, progress = self.args, self.env, self.env.device, self.model, self.progress
        model = model_raw
        if args.compile == "all":  # compiled in place, so state-dict keys stay plain
            model.compile(backend=args.compile_backend)
        if env.world_size > 1:
            model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
        total_steps = args.epochs * self.steps_per_epoch
        last_step = min(total_steps, args.max_steps or total_steps)
        cosine = mdra.warmup_cosine(1.0, total_steps, 0)  # per step, from 1 to 0
        base_lrs = self.base_lrs
        autocast = runtime.autocast(device, args.amp)
        skips = data.SkippedImages(self.log)
        runtime.defer_stop_signals()
        ended = self.step // self.steps_per_epoch  # the epochs trained to their end
        if self.step % self.steps_per_epoch == 0 and ended in self.eval_epochs and self.metrics.get("epoch") != ended:
            # A stop signal or a crash after the epoch's last step came before its evaluation; the loop starts
            # at the next epoch, so the evaluation is now (of the same weights).
            self.evaluate_epoch(ended, autocast, None)
            self.save()
        for epoch in range(self.step // self.steps_per_epoch, args.epochs):
            if self.step >= last_step:
                break
            self.sampler.set_epoch(epoch, start_batch=self.step % self.steps_per_epoch)
            model.train()
            if args.linear:
                model_raw.backbone.eval()  # BatchNorm keeps the pretrained statistics
            epoch_tic = time.perf_counter()
            for images, labels, skipped, unread in runtime.timed(self.loader, progress):
                skips.add(skipped, unread)
                for group, base_lr in zip(self.optimizer.param_groups, base_lrs):
                    group["lr"] = base_lr * float(cosine[self.step])
                with autocast:
                    loss = F.cross_entropy(model(to_unit_float(images, device, self.memory_format)),
                                           labels.to(device, non_blocking=True))
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                progress.add(loss.detach())
                if self.step % args.log_every == 0 or self.step == last_step:
                    self.log_window(epoch, base_lrs[0] * float(cosine[self.step - 1]), last_step, skips)
                runtime.exit_if_stop_requested(env.control, self.save, self.log, self.step, self.ckpt_path)
                if self.step % args.save_every == 0:
                    self.save()
                if self.step >= last_step:
                    break
            if self.step < (epoch + 1) * self.steps_per_epoch:  # --max-steps ended the run inside this epoch
                break
            if env.world_size > 1:  # each rank's last batch moved its own BatchNorm statistics
                runtime.broadcast_buffers(model_raw)
            if epoch + 1 in self.eval_epochs:
                self.evaluate_epoch(epoch + 1, autocast, epoch_tic)
                progress.tic += self.eval_times[-1]  # the training speed of the next log line leaves it out
            self.save()
        if progress.last_saved != self.step:
            self.save()

    def log_window(self, epoch, lr, last_step, skips):
        """The log line and record of the steps since the last one. The eta counts the evaluations still due at
        the mean time of those done; before the first, at the training speed, an evaluated image costing a
        third of a trained one (no backward pass) or, in the linear probe, as much."""
        args, step = self.args, self.step
        window = self.progress.window(step, args.batch_size, last_step, self.env, self.ckpt_path, "finetune.py",
                                      hint=" (try a lower --lr)")
        evals_left = sum(step <= e * self.steps_per_epoch <= last_step for e in self.eval_epochs)
        eval_s = (sum(self.eval_times) / len(self.eval_times) if self.eval_times
                  else self.eval_size / window["rate"] / (1 if args.linear else 3))
        record = {"epoch": epoch + 1, "step": step, "loss": window["loss"], "lr": lr, "images_per_s": window["rate"],
                  "data_wait": window["data_wait"], "eta_s": window["eta_s"] + evals_left * eval_s,
                  "peak_mem_gb": window["peak_mem_gb"], "skipped_images": skips.total}
        eta = str(datetime.timedelta(seconds=round(record["eta_s"])))
        eta = "~" + eta if evals_left and not self.eval_times else eta  # an estimate until an evaluation is timed
        self.log.print(f"epoch {epoch + 1}/{args.epochs} step {step}/{args.epochs * self.steps_per_epoch} loss "
                       f"{record['loss']:.4f} lr {lr:.4g} {record['images_per_s']:.0f} img/s data "
                       f"{100 * record['data_wait']:.0f}% eta {eta} mem {record['peak_mem_gb']:.2f}G"
                       + (f" skipped {skips.total}" if skips.total else ""))
        self.log.json(record)
        chance = math.log(self.info.num_classes)
        if record["loss"] > 2 * chance and not self.warned:  # e.g. the patent's lr 0.3 on 10 classes
            self.warned = True
            self.log.print(f"warning: the training loss {record['loss']:.2f} is over twice the chance level "
                           f"ln {self.info.num_classes} = {chance:.2f}: the learning rate is likely too high for this "
                           "data; try a lower --lr (--holdout chooses one without the test split).")

    def evaluate_epoch(self, epoch, autocast, epoch_tic):
        """Evaluate the network after epoch (counted from 1), log it and keep it as self.metrics. epoch_tic:
        when the epoch's training began in this process (None: in an earlier one)."""
        eval_tic = time.perf_counter()
        try:
            top1, top5, counted = evaluate(self.model, self.val_loader, self.env.device, self.memory_format, autocast)
        except UsageError:  # an unreadable image, on every rank: keep the epoch it evaluated
            self.save()
            raise
        self.eval_times.append(time.perf_counter() - eval_tic)
        self.metrics = {"epoch": epoch, "top1": top1, "top5": top5, "eval": self.eval_name, "eval_images": counted}
        self.log.print(f"epoch {epoch}/{self.args.epochs} {self.eval_name} top-1 {top1:.2f} top-5 {top5:.2f} "
                       f"({counted} images)")
        self.log.json({"event": "epoch", **self.metrics, "step": self.step,
                       **({"resumed": True} if epoch_tic is None else {"time_s": time.perf_counter() - epoch_tic})})

    def save(self):
        """Write the classifier checkpoint (rank 0); never weights that a non-finite loss has touched."""
        args, info, progress = self.args, self.info, self.progress
        progress.check_finite(progress.last_saved, self.step, self.ckpt_path, "finetune.py", hint=" (try a lower --lr)")
        progress.last_saved = self.step
        runtime.save_on_main(self.env, lambda: runtime.checkpoint_state(
            CLASSIFIER_FORMAT, args, self.step, self.steps_per_epoch, self.width, self.model.backbone, self.optimizer,
            self.scaler, info, self.fingerprint, args.batch_size // self.env.world_size, head=self.model.head.state_dict(),
            num_classes=info.num_classes, class_names=list(info.class_names), resize=self.resize, metrics=self.metrics),
            self.ckpt_path)


# ------------------------------------------------------------------------------------------------
# Classifying images (patent step 7)
# ------------------------------------------------------------------------------------------------

def export(model, path, ckpt):
    """The whole classifier, normalisation included, as TorchScript (.pt, for torch.jit.load) or
    torch.export (.pt2, for torch.export.load): input float [N, 3, H, W] in [0, 1], output logits.
    classifier.json inside names the classes and the expected crop."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().float().eval()
    meta = {"classifier.json": json.dumps({"class_names": ckpt["class_names"], "img_size": ckpt["img_size"],
                                           "resize": ckpt["resize"], "mean": ckpt["mean"], "std": ckpt["std"]})}
    size = runtime.saved_bytes(model.state_dict())
    if path.suffix == ".pt":
        with warnings.catch_warnings():  # recent torch calls TorchScript deprecated; .pt2 is its successor
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
            with runtime.atomic_file(path, size) as tmp:
                torch.jit.save(torch.jit.script(model), tmp, _extra_files=meta)
    else:
        example = torch.rand(2, 3, ckpt["img_size"], ckpt["img_size"])
        Dim = torch.export.Dim
        program = torch.export.export(model, (example,),
                                      dynamic_shapes={"images": {0: Dim("batch", min=1), 2: Dim.AUTO, 3: Dim.AUTO}})
        with runtime.atomic_file(path, size) as tmp:
            torch.export.save(program, tmp, extra_files=meta)


def is_export(path):
    """Whether path is a classifier that export wrote: an archive of torch.export or TorchScript holding the
    classifier.json it adds."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/extra/classifier.json") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def image_files(paths):
    """The given files, and the image files under the given folders (data.image_paths, the rule of data folders):
    each file once, where it first comes (a file named and inside a named folder is classified once). A named
    file that the rule does not take as an image, or that is no regular file, is an error saying why."""
    files, taken = [], set()  # taken: real paths
    if any(not str(path) for path in paths):  # Path("") would be the working directory
        raise UsageError("--predict got an empty path.")
    for path in map(Path, paths):
        if path.is_dir():
            files += map(Path, data.image_paths(path, taken))
            continue
        try:
            kind = data.special_file(path)
        except FileNotFoundError:
            raise UsageError(f"--predict {path} is a link to {os.readlink(path)}, which does not exist."
                             if path.is_symlink() else f"--predict {path} does not exist.") from None
        except OSError as e:
            raise UsageError(f"--predict {path} cannot be looked at ({e.strerror}).") from None
        if kind:
            raise UsageError(f"--predict {path} is {kind}, not an image file.")
        if path.name.startswith("."):
            raise UsageError(f"--predict {path} is a hidden file (its name starts with \".\"), which is not data "
                             "in a folder either; rename it to classify it.")
        if not data.is_image_name(path.name):
            raise UsageError(f"--predict {path} is not named as an image: {path.suffix or 'no extension'} is not "
                             "an extension of a format PIL reads (.jpg, .png, .gif, .tif, .webp and others).")
        if os.path.realpath(path) not in taken:
            taken.add(os.path.realpath(path))
            files.append(path)
    if not files:
        raise UsageError(f"--predict {' '.join(map(str, paths))} holds no image files.")
    return files


@torch.no_grad()
def predict(model, files, ckpt, device, batch_size):
    """Print each image's five most probable classes with their probabilities. A file that cannot be
    read is named on stderr with the reason, the others are classified, and then their count is an error."""
    transform = data.eval_transform(ckpt["img_size"], ckpt["resize"])
    model.to(device)
    unreadable = 0
    for first in range(0, len(files), batch_size):
        if runtime.stop_requested():  # after fine-tuning, whose loop deferred SIGINT and SIGTERM
            raise SystemExit(128 + runtime.STOP_SIGNALS[0])
        paths, images = [], []
        for path in files[first:first + batch_size]:
            try:
                images.append(transform(data.open_image(path)))
                paths.append(path)
            except data.READ_ERRORS as e:
                print(f"{path}: cannot be read ({e})", file=sys.stderr)
                unreadable += 1
        if not paths:
            continue
        probs = model(to_unit_float(torch.stack(images), device)).float().softmax(dim=1)
        top = probs.topk(min(5, probs.shape[1]), dim=1)
        for path, values, indices in zip(paths, top.values.tolist(), top.indices.tolist()):
            print(f"{path}: " + ", ".join(f"{ckpt['class_names'][c]} {p:.3f}" for p, c in zip(values, indices)))
    if unreadable:
        raise UsageError(f"{unreadable} of the {len(files)} files given to --predict cannot be read (named above); "
                         "the others are classified above.")


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def run(args):
    """Fine-tune (or resume fine-tuning), then --export or --predict with the classifier; or, given a fine-tuned
    checkpoint, only --export or --predict."""
    check_flags(args)
    predict_files = image_files(args.predict) if args.predict else None  # before training, which may be long
    env = runtime.setup_distributed(args.device)
    start = runtime.load_checkpoint(args.ckpt, formats=("mdra", CLASSIFIER_FORMAT)) if args.ckpt else None
    if start is not None and start["format"] == CLASSIFIER_FORMAT:
        if not (args.export or args.predict):
            raise UsageError(f"{args.ckpt} is already a fine-tuned classifier: use it with --export or --predict, "
                             "or fine-tune a pretraining checkpoint (an interrupted run resumes from its --out-dir).")
        refuse_unused_flags(args)
        classifier_path, classifier = Path(args.ckpt), start
    elif start is not None and (args.export or args.predict):  # rather than a long fine-tune nobody asked for
        out_dir = shlex.quote(args.out_dir)
        raise UsageError(f"{args.ckpt} is a pretraining checkpoint, not a classifier: fine-tune it first "
                         f"(python3 finetune.py --ckpt {shlex.quote(args.ckpt)} --label-fraction 0.01 --out-dir "
                         f"{out_dir}), then --export or --predict with --ckpt {out_dir}/checkpoint.pth.")
    else:
        if start is not None:  # what fine-tuning reads of a pretraining checkpoint
            runtime.require_keys(start, args.ckpt, runtime.BACKBONE_KEYS, "mdra.py")
        runtime.take_out_dir(args.out_dir, env, data.image_folder_root(args.data))
        resumed = resumed_checkpoint(args.out_dir)
        args = resolve_sources(args, start, resumed.get("args", {}) if resumed else {})
        classifier_path, classifier = FineTuning(args, env, start, resumed).run(), None
    if env.is_main and (args.export or args.predict):
        classifier = classifier or runtime.load_checkpoint(classifier_path, formats=(CLASSIFIER_FORMAT,))
        model = load_classifier(classifier, classifier_path)
        if args.export:
            export(model, args.export, classifier)
            print(f"exported the classifier of {classifier_path} to {args.export}")
        if args.predict:
            predict(model, predict_files, classifier, env.device, args.batch_size)
    return classifier_path


def check_flags(args):
    """What the flags alone say cannot work, before any work."""
    if args.export:  # checked now: the export comes after the training
        runtime.require_folder(Path(args.export).parent, "--export's folder")
        if Path(args.export).is_dir():
            raise UsageError(f"--export {args.export} is a folder; give a file name, "
                             f"e.g. {Path(args.export) / 'classifier.pt2'}.")
        if Path(args.export).suffix not in (".pt", ".pt2"):
            raise UsageError(f"--export {args.export} must end in .pt2 (torch.export) or .pt (TorchScript).")
        runtime.require_outside(args.export, data.image_folder_root(args.data), "--export")
        runtime.require_replaceable(args.export, "--export", is_export, "a classifier exported by finetune.py",
                                    inputs=[args.ckpt] * bool(args.ckpt))
    if bool(args.ckpt) == args.random_init:
        raise UsageError("give either --ckpt (a pretraining or fine-tuned checkpoint) or --random-init.")
    if args.label_fraction is not None and not 0 < args.label_fraction <= 1:
        raise UsageError(f"--label-fraction {args.label_fraction} is not in (0, 1].")
    if args.label_fraction is not None and args.subset_file:
        raise UsageError("give --label-fraction or --subset-file, not both.")
    runtime.require_at_least(1, args, "batch_size")  # here too: --predict of a classifier skips resolve_args


def refuse_unused_flags(args):
    """--export and --predict of a fine-tuned classifier: the flags given that they do not use are
    refused (a flag left at its default was not given), rather than silently ignored."""
    parser = get_parser()
    unused = [f"--{name.replace('_', '-')}" for name, value in sorted(vars(args).items())
              if name not in CLASSIFY_USES and value != parser.get_default(name)]
    if unused:
        raise UsageError(f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect on --export and "
                         f"--predict of the fine-tuned classifier {args.ckpt}, whose data, size and training are "
                         "fixed; leave " + ("it" if len(unused) == 1 else "them") + " out.")


def get_parser():
    p = argparse.ArgumentParser(
        prog="finetune.py", formatter_class=runtime.HelpFormatter,
        description="Fine-tune (or linearly probe) an MDRA backbone with a linear classifier on a labelled "
                    "subset, export it, classify images (defaults: the patent's 100 epochs of SGD at lr 0.3; "
                    "0.03 on small data sets). --out-dir also gets subset.txt, the labelled images; a run resumed "
                    "there keeps, left out, its --data, --data-dir, --img-size and --lr.")
    tuning = p.add_argument_group("fine-tuning and the linear probe")
    a = tuning.add_argument
    a("--ckpt", default=None,
      help="a pretraining checkpoint (mdra.py) to fine-tune, or a fine-tuned one to --export or --predict with")
    a("--random-init", action="store_true", help="start from random weights: the supervised-from-scratch baseline")
    a("--label-fraction", type=runtime.finite_float, default=None,
      help="train on this fraction of the labels (0.01, 0.1), the same share of every class, drawn with --seed; "
           "default: all labels")
    a("--subset-file", default=None,
      help="train on the images this file names, one per line as class/file or as a file name alone "
           "(the ImageNet 1%% / 10%% split files)")
    a("--holdout", type=int, default=0, metavar="N",
      help="evaluate on N training images outside the labelled subset (the same share of every class, "
           "drawn with --seed) instead of the validation split: for choosing hyperparameters; with all labels, "
           "they are taken out of the labelled set")
    a("--eval-every", type=int, default=1, metavar="EPOCHS", help="evaluate every this many epochs, and after the last")
    a("--linear", action="store_true",
      help="linear probe: only the classifier learns; the backbone is frozen, BatchNorm in eval mode")
    a("--epochs", type=int, default=100, help="length of the schedule")
    a("--batch-size", type=int, default=256, help="global batch over all ranks")
    a("--lr", type=runtime.finite_float, default=None,
      help="SGD learning rate of the classifier (and of the backbone without --lr-backbone), cosine to 0 per step; "
           f"default: {SMALL_DATA_LR} on the named small data sets (held-out trials chose it on Fashion-MNIST, where "
           f"the patent's {PATENT_LR} diverges: the new layer's curvature scales as 1/classes), else {PATENT_LR}")
    a("--lr-backbone", type=runtime.finite_float, default=None,
      help="a separate learning rate for the backbone when fine-tuning (e.g. 10x lower than --lr)")
    a("--weight-decay", type=runtime.finite_float, default=0.0, help="SGD weight decay")
    mdra.add_network_flags(tuning, from_checkpoint=True)
    classify = p.add_argument_group("the classifier")
    classify.add_argument("--export", default=None, metavar="PATH",
                          help="write the classifier for use without this code: .pt2 (torch.export) or .pt "
                               "(TorchScript, which PyTorch has deprecated)")
    classify.add_argument("--predict", nargs="+", default=None, metavar="PATH",
                          help="image files or folders to classify: prints each one's top-5 classes with probabilities")
    runtime.add_data_flags(p.add_argument_group("data"), data.SMALL_DATASETS, from_checkpoint=True)
    runtime.add_run_flags(p.add_argument_group("run and resume"), "runs/finetune",
                          compile_help=" (the classifier); default: all on CUDA, none on the CPU")
    return p


def main(argv=None):
    return runtime.run_main(run, argv, get_parser(), memory_flags="--batch-size or --img-size")


if __name__ == "__main__":
    main()
