"""Weighted k-nearest-neighbour evaluation of a representation (MDRA_SPEC.md section 7).

Backbone features (after global pooling, centre crop, no augmentation) of the train split form the
bank, those of the val/test split are the queries; each query takes the k most cosine-similar bank
images, which vote for their class with weight exp(s / T), T = 0.07. Reported: top-1 and top-5 for
k in 10 20 100 200, all from one top-k search. The protocol is DINO's eval_knn.py; unlike it, the
checkpoint is loaded strictly, shards are gathered without padded duplicates, the similarity is
chunked by a memory budget, and the bank may live in host memory.

Launch:
    python eval_knn.py --ckpt runs/mdra/checkpoint.pth                    # data set, arch, size: the checkpoint's
    python eval_knn.py --ckpt runs/mdra/checkpoint.pth --random-init      # baseline: same network, untrained
    python eval_knn.py --ckpt runs/mdra/checkpoint.pth --pixels           # baseline: raw pixels as features
    torchrun --nproc_per_node=8 eval_knn.py --ckpt runs/mdra/checkpoint.pth --data /path/to/imagenet
    python eval_knn.py --ckpt ... --bank-device cpu                       # bank in host memory, streamed to the GPU

The results go to knn.json next to the checkpoint (or --out). mdra.py --knn-every E calls
knn_monitor() below at epoch ends.
"""
import argparse
import datetime
import functools
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import mdra

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_CHUNK_MB = 1024.0
MONITOR_K = 20


# ------------------------------------------------------------------------------------------------
# Weighted kNN voting (spec sections 7 and 9)
# ------------------------------------------------------------------------------------------------

def weighted_knn_votes(train_features, train_labels, test_features, num_classes, ks, temperature=0.07,
                       chunk_mb=DEFAULT_CHUNK_MB):
    """Vote scores of a weighted kNN for several k from a single top-k search.

    train_features [N, d] and train_labels [N] may live on any device: the computation runs where
    test_features [n, d] are, and the bank is moved there piece by piece (so a bank in host memory is
    read once per call, never copied to the GPU whole). Features are L2-normalised here.
    For each query the max(ks) most cosine-similar train images are found once; for every k in ks,
    the k nearest vote for their class with weight exp(s / temperature).
    chunk_mb bounds the extra memory: one normalised bank piece and one [queries x piece] similarity
    block, each at most chunk_mb; the result does not depend on it (up to float rounding of the
    similarities, which the block shapes change in the last bit).
    Returns {k: scores [n, num_classes]}, float64 if either feature set is float64 else float32.
    """
    ks = sorted(set(int(k) for k in ks))
    n_train, n_test = train_features.shape[0], test_features.shape[0]
    if not ks or ks[0] < 1 or ks[-1] > n_train:
        raise ValueError(f"every k must be between 1 and the {n_train} train images; got {ks}.")
    k_max = ks[-1]
    device = test_features.device
    dtype = torch.float64 if torch.float64 in (train_features.dtype, test_features.dtype) else torch.float32
    budget_elements = max(1, int(chunk_mb * 2**20) // dtype.itemsize)
    piece_rows = max(1, min(n_train, budget_elements // train_features.shape[1]))
    query_rows = max(1, min(n_test, budget_elements // piece_rows))

    queries = F.normalize(test_features.to(dtype), dim=1)
    # The k_max best so far per query, sorted; -inf marks slots no bank image has filled yet.
    top_sim = torch.full((n_test, k_max), -torch.inf, dtype=dtype, device=device)
    top_idx = torch.zeros((n_test, k_max), dtype=torch.long, device=device)
    for start in range(0, n_train, piece_rows):
        piece = F.normalize(train_features[start:start + piece_rows].to(device, dtype, non_blocking=True), dim=1)
        for q in range(0, n_test, query_rows):
            rows = slice(q, q + query_rows)
            sim, idx = (queries[rows] @ piece.T).topk(min(k_max, piece.shape[0]), dim=1)
            sim = torch.cat([top_sim[rows], sim], dim=1)
            idx = torch.cat([top_idx[rows], idx + start], dim=1)
            top_sim[rows], best = sim.topk(k_max, dim=1)
            top_idx[rows] = idx.gather(1, best)

    weights = (top_sim / temperature).exp()
    neighbour_labels = train_labels.to(device)[top_idx]
    return {k: torch.zeros(n_test, num_classes, dtype=dtype, device=device)
            .scatter_add_(1, neighbour_labels[:, :k], weights[:, :k]) for k in ks}


def weighted_knn(train_features, train_labels, test_features, num_classes, k=20, temperature=0.07):
    """Vote scores [n_test, num_classes] of the k nearest train images by cosine similarity s, each voting
    with weight exp(s / temperature) (spec section 9). The features are L2-normalised here."""
    return weighted_knn_votes(train_features, train_labels, test_features, num_classes, [k], temperature)[k]


def count_correct(scores, labels, topk=(1, 5)):
    """Number of queries whose class is among the top-k voted, for each k in topk, with ties broken at
    random in expectation: a class that shares its score with t classes (itself included) while g
    classes score more is counted min(1, (k - g) / t) times, its chance to come out in the first k.

    A class counts only if it got a vote. (Sorting the scores, as DINO does, puts tied classes in an
    arbitrary order: it can credit a class no neighbour voted for, and whether a class tied with the
    winner counts depends on that order; when the features collapse to one point, all classes tie.)
    """
    own = scores.gather(1, labels[:, None])
    above = (scores > own).sum(dim=1)
    tied = (scores == own).sum(dim=1)
    voted = own[:, 0] > 0
    return {k: float(((k - above).clamp(min=0).double() / tied).clamp(max=1)[voted].sum()) for k in topk}


def knn_accuracy(bank, bank_labels, queries, query_labels, num_classes, ks, temperature, chunk_mb, env):
    """{k: (top-1 %, top-5 %)} over the queries of all ranks: each rank votes for its own queries
    against the whole bank, and only the counts are summed."""
    votes = weighted_knn_votes(bank, bank_labels, queries, num_classes, ks, temperature, chunk_mb)
    query_labels = query_labels.to(queries.device)
    counts = [queries.shape[0]] + [c for k in votes for c in count_correct(votes[k], query_labels).values()]
    counts = torch.tensor(counts, dtype=torch.float64, device=env.device)
    if env.world_size > 1:
        dist.all_reduce(counts)
    percent = (100 * counts[1:] / counts[0]).tolist()
    return {k: (percent[2 * i], percent[2 * i + 1]) for i, k in enumerate(votes)}


# ------------------------------------------------------------------------------------------------
# Features, one shard per rank
# ------------------------------------------------------------------------------------------------

def shard(n, env):
    """This rank's contiguous part of range(n); parts differ in size by at most one, none overlap."""
    return slice(n * env.rank // env.world_size, n * (env.rank + 1) // env.world_size)


class EvalImages(Dataset):
    """images[indices[i]] through the evaluation transform (labels are taken from .targets instead),
    with "path: why" if its file cannot be read (else ""): extract_features then stops with that line,
    as skipping an image would change the bank or the accuracy's denominator."""

    def __init__(self, images, indices, transform):
        self.images, self.indices, self.transform = images, indices, transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        try:
            image, _ = self.images[self.indices[i]]
            return self.transform(image), ""
        except mdra.READ_ERRORS as e:  # a stand-in, so that the name reaches the main process
            why = f"{mdra.image_path(self.images, self.indices[i])}: {mdra.read_error(e)}"
            return self.transform(Image.new("RGB", (1, 1))), why


@torch.no_grad()
def extract_features(net, images, indices, transform, env, batch_size, workers, amp, channels_last, out_device,
                     progress=None, then=0):
    """Features [len(indices), d] float32 of images[indices] on out_device, net in its current mode.
    Returns an empty [0, 0] tensor for an empty shard (gather_rows fills in the width).
    progress: a name to report rank 0's progress under, every tenth of its shard, with an eta that
    counts `then` more images to extract after these at the same speed (the val split after the bank)."""
    cuda = env.device.type == "cuda"
    loader = DataLoader(EvalImages(images, indices, transform), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=cuda, worker_init_fn=mdra.ignore_stop_signals,
                        generator=torch.Generator().manual_seed(0))  # its seed draw must not touch the global RNG
    autocast = torch.autocast(env.device.type, dtype=mdra.AMP_DTYPES[amp], enabled=mdra.AMP_DTYPES[amp] is not None)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    features, done, tic, report_every = None, 0, time.perf_counter(), max(1, len(loader) // 10)
    for i, (x, unreadable) in enumerate(loader):
        if any(unreadable):
            raise mdra.UsageError(f"cannot read {next(why for why in unreadable if why)}; an evaluation "
                                  "needs every image: remove or replace it.")
        x = x.to(env.device, non_blocking=True, memory_format=memory_format)
        with autocast:
            batch = net(x)
        if features is None:  # filled in place: concatenating batches would hold the features twice
            features = torch.empty(len(indices), batch.shape[1], device=out_device)
        features[done:done + len(batch)] = batch
        done += len(batch)
        if progress and env.is_main and (i + 1) % report_every == 0:
            elapsed = time.perf_counter() - tic
            eta = datetime.timedelta(seconds=round(elapsed / done * (len(indices) - done + then)))
            print(f"{progress}: {done}/{len(indices)} images of rank 0 in {elapsed:.0f} s, eta {eta}"
                  + (f" (with {then} more images to come)" if then else ""), flush=True)
    return features if features is not None else torch.zeros(0, 0, device=out_device)


def gather_rows(local, env, chunk_mb=DEFAULT_CHUNK_MB):
    """Every rank's rows in rank order, on every rank, on local's device.

    Shards may differ in size (or be empty): the sizes are exchanged first, each rank pads its shard
    to the largest and the padding is cut off again, so each image appears exactly once. The exchange
    runs through env.device (NCCL needs the GPU) in pieces of at most chunk_mb per rank, so a bank
    kept in host memory never has to fit on the GPU whole.
    """
    if env.world_size == 1:
        return local
    shape = torch.tensor(local.shape, device=env.device)
    shapes = [torch.empty_like(shape) for _ in range(env.world_size)]
    dist.all_gather(shapes, shape)
    sizes = [int(s[0]) for s in shapes]
    width = max(int(s[1]) for s in shapes)
    offsets = [sum(sizes[:r]) for r in range(env.world_size)]
    out = torch.empty(sum(sizes), width, device=local.device)
    piece = max(1, int(chunk_mb * 2**20) // (4 * width))
    for start in range(0, max(sizes), piece):
        rows = min(piece, max(sizes) - start)
        block = torch.zeros(rows, width, device=env.device)
        mine = local[start:start + rows]
        if len(mine):  # an empty shard has no width to copy
            block[:len(mine)] = mine
        parts = [torch.empty_like(block) for _ in range(env.world_size)]
        dist.all_gather(parts, block)
        for r, part in enumerate(parts):
            real = max(0, min(rows, sizes[r] - start))
            out[offsets[r] + start:offsets[r] + start + real] = part[:real]
    return out


# ------------------------------------------------------------------------------------------------
# The in-training monitor (mdra.py --knn-every)
# ------------------------------------------------------------------------------------------------

def bank_subset(n, size, seed):
    """Sorted indices of the bank's train images: `size` of the n drawn with seed, or all of them for 0
    (or size >= n). The monitor's --knn-subset and eval_knn.py's draw the same with the same seed."""
    if 0 < size < n:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values
    return torch.arange(n)


@functools.lru_cache(maxsize=1)
def monitor_datasets(data, data_dir, synthetic_size, img_size):
    """Built once per run: listing an ImageFolder of a million files takes a while."""
    bank_images, info = mdra.build_dataset(data, data_dir, "train", synthetic_size, img_size)
    query_images, _ = mdra.build_dataset(data, data_dir, "val", synthetic_size, img_size)
    return bank_images, query_images, info


def knn_monitor(backbone, args, env):
    """Weighted kNN (k = 20, or the bank size if smaller) of the backbone during pretraining:
    {"top1@20": %, "top5@20": %}.

    args: mdra.py's resolved arguments (data, data_dir, synthetic_size, img_size, knn_subset,
    batch_size, workers, amp, channels_last, seed); env: its mdra.DistEnv. Every rank must call it.
    The bank is --knn-subset train images (a subset seeded by --seed, or all) kept in host memory, so
    it never competes with training for GPU memory. The backbone runs in eval mode (BatchNorm running
    statistics, which it therefore does not update) and gets its modes back; nothing here draws from
    the global random generators, so training continues exactly as without the monitor.
    """
    bank_images, query_images, info = monitor_datasets(args.data, args.data_dir, args.synthetic_size, args.img_size)
    bank_indices = bank_subset(len(bank_images), args.knn_subset, args.seed)
    k = min(MONITOR_K, len(bank_indices))  # a monitor must not end a training run over a tiny bank
    query_indices = torch.arange(len(query_images))[shard(len(query_images), env)]
    transform = mdra.eval_transform(info, args.img_size)
    extract = functools.partial(extract_features, backbone, transform=transform, env=env,
                                batch_size=max(1, args.batch_size // env.world_size), workers=args.workers,
                                amp=args.amp, channels_last=args.channels_last)
    modes = [(module, module.training) for module in backbone.modules()]
    backbone.eval()
    try:
        bank = gather_rows(extract(images=bank_images, indices=bank_indices[shard(len(bank_indices), env)].tolist(),
                                   out_device="cpu"), env)
        queries = extract(images=query_images, indices=query_indices.tolist(), out_device=env.device)
    finally:
        for module, training in modes:
            module.training = training
    bank_labels = torch.tensor(bank_images.targets)[bank_indices]
    query_labels = torch.tensor(query_images.targets)[query_indices]
    (top1, top5), = knn_accuracy(bank, bank_labels, queries, query_labels, info.num_classes, [k],
                                 0.07, DEFAULT_CHUNK_MB, env).values()
    return {f"top1@{k}": top1, f"top5@{k}": top5}


# ------------------------------------------------------------------------------------------------
# The evaluation script
# ------------------------------------------------------------------------------------------------

def feature_network(args, ckpt, info):
    """The network whose outputs are the features, and a description of it for the report."""
    if args.pixels:
        return nn.Flatten(), f"raw pixels ({3 * args.img_size ** 2}-d)"
    missing = [key for key in ("arch", "small_stem", "backbone") if ckpt and key not in ckpt]
    if missing:
        raise mdra.UsageError(f"{args.ckpt} lacks {', '.join(missing)}; it was not written by mdra.py or finetune.py.")
    arch = args.arch or (ckpt["arch"] if ckpt else "resnet50")
    small_stem = ckpt["small_stem"] if ckpt else (info.small or args.img_size <= 64)
    mdra.require_img_size(args.img_size, small_stem)
    torch.manual_seed(args.seed)  # --random-init: the same untrained weights on every rank
    backbone, _ = mdra.build_backbone(arch, small_stem)
    if args.random_init:
        return backbone, f"{arch}, random init (seed {args.seed})"
    mdra.load_strict(backbone, ckpt["backbone"], f"the backbone in {args.ckpt} (a {ckpt['arch']}) for --arch {arch}")
    return backbone, f"{arch} from {args.ckpt} (epoch {ckpt.get('epoch')}, step {ckpt.get('step')})"


def features_from_images(args, env, bank_device):
    """(bank, bank labels, this rank's queries, all query labels, classes, description) from a network."""
    if not (args.ckpt or args.random_init or args.pixels):
        raise mdra.UsageError("give --ckpt, or --random-init or --pixels for a baseline, or --load-features.")
    ckpt = mdra.load_checkpoint(args.ckpt, formats=("mdra", "mdra-classifier")) if args.ckpt else None
    saved = ckpt.get("args", {}) if ckpt else {}
    args.data = args.data or saved.get("data") or "fashion-mnist"
    args.data_dir = args.data_dir or saved.get("data_dir") or "data"
    args.synthetic_size = args.synthetic_size or saved.get("synthetic_size") or 1024
    args.img_size = args.img_size or (ckpt.get("img_size") if ckpt else None) or saved.get("img_size")
    bank_images, info = mdra.build_dataset(args.data, args.data_dir, "train", args.synthetic_size, args.img_size or 32)
    query_images, _ = mdra.build_dataset(args.data, args.data_dir, "val", args.synthetic_size, args.img_size or 32)
    mdra.require_two_classes(info.num_classes, args.data, "a kNN evaluation")
    args.img_size = args.img_size or info.native_size
    bank_indices = bank_subset(len(bank_images), args.knn_subset, args.seed)
    check_k(args.k, len(bank_indices))  # before the long part

    net, description = feature_network(args, ckpt, info)
    if len(bank_indices) < len(bank_images):
        description += f", bank of {len(bank_indices)} of the {len(bank_images)} train images (seed {args.seed})"
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    net.to(env.device, memory_format=memory_format).eval()
    extract = functools.partial(extract_features, net, transform=mdra.eval_transform(info, args.img_size), env=env,
                                batch_size=args.batch_size, workers=args.workers, amp=args.amp,
                                channels_last=args.channels_last)
    bank_shard = bank_indices[shard(len(bank_indices), env)].tolist()
    query_shard = range(len(query_images))[shard(len(query_images), env)]
    bank = gather_rows(extract(images=bank_images, indices=bank_shard, out_device=bank_device, progress="train",
                               then=len(query_shard)), env, args.chunk_mb)
    queries = extract(images=query_images, indices=query_shard, out_device=env.device, progress="val")
    return (bank, torch.tensor(bank_images.targets)[bank_indices], queries, torch.tensor(query_images.targets),
            info.num_classes, description)


def load_features(directory, env, bank_device):
    """The files of --save-features: (bank, labels, this rank's queries, all query labels, classes, description)."""
    parts = []
    for name in ("train", "val"):
        path = Path(directory) / f"{name}.pth"
        try:
            part = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a missing, truncated or foreign file
            part = type(e).__name__
        if not (isinstance(part, dict) and {"features", "labels", "num_classes", "description"} <= part.keys()):
            raise mdra.UsageError(f"{path} is not a feature file written by --save-features "
                                  f"({part if isinstance(part, str) else 'other contents'}).")
        parts.append(part)
    train, val = parts
    if train["description"] != val["description"] or train["num_classes"] != val["num_classes"]:
        raise mdra.UsageError(f"{directory}'s train.pth and val.pth come from different features "
                              f"({train['description']}; {val['description']}).")
    queries = val["features"][shard(len(val["labels"]), env)].to(env.device)
    return (train["features"].to(bank_device), train["labels"], queries, val["labels"], train["num_classes"],
            f"{train['description']}, loaded from {directory}")


def save_features(directory, bank, bank_labels, queries, query_labels, num_classes, description):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, features, labels in (("train", bank, bank_labels), ("val", queries, query_labels)):
        mdra.save_checkpoint({"features": features.cpu(), "labels": labels.cpu(), "num_classes": num_classes,
                              "description": description}, directory / f"{name}.pth")


def check_k(ks, n_train):
    if max(ks) > n_train:
        raise mdra.UsageError(f"--k {max(ks)} is more than the {n_train} train images in the bank.")


def default_out(args):
    name = "knn_random-init.json" if args.random_init else "knn_pixels.json" if args.pixels else "knn.json"
    if args.ckpt:
        return Path(args.ckpt).parent / name
    return Path(args.load_features or "runs") / name


def evaluate(args):
    env = mdra.setup_distributed(args.device)
    cuda = env.device.type == "cuda"
    args.amp = args.amp or ("bf16" if cuda else "off")
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    if args.bank_device == "cuda" and not cuda:
        raise mdra.UsageError("--bank-device cuda needs the evaluation itself on a GPU (--device cuda).")
    bank_device = torch.device("cpu") if args.bank_device == "cpu" else env.device
    out = Path(args.out) if args.out else default_out(args)  # checked now: the results are written after all the work
    if args.out and out.is_dir():
        raise mdra.UsageError(f"--out {args.out} is a folder; give a file name, e.g. {out / 'knn.json'}.")
    if args.out or out.parent.exists() or not (args.ckpt or args.load_features):  # not the folder of a mistyped input
        mdra.require_folder(out.parent, "--out's folder" if args.out else "the default --out's folder")
    if args.save_features:
        mdra.require_folder(args.save_features, "--save-features")
    if args.load_features:  # what made the features is in the folder; these would only mislabel the results
        given = [f"--{name.replace('_', '-')}" for name in ("ckpt", "arch", "random_init", "pixels", "data", "img_size",
                                                             "knn_subset") if getattr(args, name)]
        if given:
            raise mdra.UsageError(f"--load-features takes the features from its folder; {', '.join(given)} would "
                                  "not change them, so leave them out.")
    if args.temperature <= 0 or args.chunk_mb <= 0 or min(args.k) < 1:
        raise mdra.UsageError("--temperature and --chunk-mb must be positive and every --k at least 1.")
    mdra.require_at_least(1, args, "batch_size")
    mdra.require_at_least(0, args, "workers", "knn_subset")
    if cuda:
        torch.backends.cudnn.benchmark = True

    if env.is_main:
        print(f"eval_knn.py git {mdra.git_sha()} | world size {env.world_size} | device {env.device}"
              f"{' (' + torch.cuda.get_device_name(env.device) + ')' if cuda else ''} | torch {torch.__version__}")
        print("args " + json.dumps(vars(args)), flush=True)
    tic = time.perf_counter()
    if args.load_features:
        found = load_features(args.load_features, env, bank_device)
    else:
        found = features_from_images(args, env, bank_device)
    bank, bank_labels, queries, query_labels, num_classes, description = found
    if args.save_features:
        all_queries = gather_rows(queries, env, args.chunk_mb)
        if env.is_main:
            save_features(args.save_features, bank, bank_labels, all_queries, query_labels, num_classes, description)
    extract_s = time.perf_counter() - tic
    check_k(args.k, bank.shape[0])

    tic = time.perf_counter()
    results = knn_accuracy(bank, bank_labels, queries, query_labels[shard(len(query_labels), env)], num_classes,
                           args.k, args.temperature, args.chunk_mb, env)
    knn_s = time.perf_counter() - tic
    if env.is_main:
        report(args, env, description, bank.shape, len(query_labels), num_classes, results, extract_s, knn_s)
    return results


def report(args, env, description, bank_shape, n_queries, num_classes, results, extract_s, knn_s):
    """The table on the console and the same numbers in a JSON file."""
    print(f"weighted kNN, T = {args.temperature:g} | {description}")
    print(f"{args.data or 'saved features'} | bank {bank_shape[0]} x {bank_shape[1]} | {n_queries} queries | "
          f"{num_classes} classes | features {extract_s:.1f} s, kNN {knn_s:.1f} s on {env.world_size} process(es)")
    print(f"{'k':>5} {'top-1':>7} {'top-5':>7}")
    for k, (top1, top5) in results.items():
        print(f"{k:>5} {top1:>7.2f} {top5:>7.2f}")
    out = Path(args.out) if args.out else default_out(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"features": description, "ckpt": args.ckpt, "data": args.data, "img_size": args.img_size,
              "n_train": bank_shape[0], "knn_subset": args.knn_subset, "n_test": n_queries, "num_classes": num_classes,
              "temperature": args.temperature, "git": mdra.git_sha(), "world_size": env.world_size,
              "results": {str(k): {"top1": top1, "top5": top5} for k, (top1, top5) in results.items()}}
    text = json.dumps(record, indent=1) + "\n"
    with mdra.atomic_file(out, len(text.encode())) as tmp:
        tmp.write_text(text)
    print(f"written to {out}")


def get_parser():
    p = argparse.ArgumentParser(
        prog="eval_knn.py", description="Weighted kNN evaluation of an MDRA checkpoint (spec section 7).",
        formatter_class=mdra.HelpFormatter)
    a = p.add_argument
    a("--ckpt", help="checkpoint of mdra.py (format 'mdra') or finetune.py ('mdra-classifier')")
    a("--arch", default=None, help="backbone architecture; default: the checkpoint's (resnet50 without one)")
    baseline = p.add_mutually_exclusive_group()
    baseline.add_argument("--random-init", action="store_true",
                          help="baseline: the same architecture untrained (seeded by --seed): what pretraining bought")
    baseline.add_argument("--pixels", action="store_true", help="baseline: the normalised pixels as features")
    a("--data", default=None,
      help="ImageFolder root (train/ and val/) or a data set name of mdra.py; default: the checkpoint's")
    a("--data-dir", default=None, help="where named data sets are read from; default: the checkpoint's")
    a("--synthetic-size", type=int, default=None, help="train images of --data synthetic; default: the checkpoint's")
    a("--img-size", type=mdra.crop_size, default=None,
      help="crop size; default: the checkpoint's, else the data set's own. " + mdra.IMG_SIZE_MINIMUM)
    a("--k", type=int, nargs="+", default=list(DEFAULT_KS), help="numbers of neighbours; all share one top-k search")
    a("--knn-subset", type=int, default=0, metavar="N",
      help="a bank of N train images drawn with --seed (0: all), as mdra.py --knn-subset N draws its monitor's with "
           "the same --seed: fewer features to extract, e.g. on a CPU")
    a("--temperature", type=mdra.finite_float, default=0.07, help="T of the vote weight exp(similarity / T)")
    a("--batch-size", type=int, default=256, help="images per forward pass on each rank")
    a("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes per rank")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--amp", default=None, choices=["bf16", "fp16", "off"],
      help="autocast of the feature extraction; default: bf16 on CUDA, off on CPU")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    a("--bank-device", default="auto", choices=["auto", "cpu", "cuda"],
      help="where the train features live: auto is --device; cpu keeps them in host memory and streams pieces to the "
           "GPU (for banks larger than the GPU memory; slower by one host-to-GPU copy of the bank)")
    a("--chunk-mb", type=mdra.finite_float, default=DEFAULT_CHUNK_MB,
      help="memory budget of one similarity block (and of one bank piece); the results do not depend on it")
    a("--save-features", default=None, metavar="DIR", help="also write the features to DIR/train.pth and DIR/val.pth")
    a("--load-features", default=None, metavar="DIR",
      help="vote on the features saved by --save-features instead of extracting them")
    a("--out", default=None, help="JSON file of the results; default: knn.json next to the checkpoint "
                                  "(knn_random-init.json, knn_pixels.json for the baselines)")
    a("--seed", type=int, default=0, help="seed of --random-init and of the --knn-subset draw")
    return p


def main(argv=None):
    # An evaluation has nothing to save: SIGINT and SIGTERM end it at once (torchrun stops other ranks so).
    return mdra.run_main(evaluate, argv, get_parser())


if __name__ == "__main__":
    main()
