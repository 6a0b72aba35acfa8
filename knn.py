"""Weighted k-nearest-neighbour classification of features (MDRA_SPEC.md sections 7 and 9), shared by
eval_knn.py and mdra.py's in-training monitor (--knn-every): the vote, its accuracy, the features of a
data set extracted one shard per rank and gathered, and the monitor itself.

Each query takes the k most cosine-similar bank features, which vote for their class with weight
exp(s / T), T = 0.07, as in DINO's eval_knn.py; unlike it, shards are gathered without padded
duplicates, the similarity is chunked by a memory budget, and the bank may live in host memory.
"""
import datetime
import functools
import math
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Subset

import data
import runtime
from runtime import UsageError

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_CHUNK_MB = 1024.0
MONITOR_K = 20


# ------------------------------------------------------------------------------------------------
# Weighted kNN voting (spec sections 7 and 9)
# ------------------------------------------------------------------------------------------------

def lowest_temperature(k, dtype=torch.float32):
    """The smallest T whose vote weights exp(s / T), s in [-1, 1], are all finite and nonzero in dtype with k
    of them summed: below it the nearest neighbours' weights overflow to inf (the classes they vote for tie)
    or the farthest ones' vanish (their class counts as not voted). About 0.012 in float32."""
    info = torch.finfo(dtype)
    return 1 / (min(math.log(info.max / k), -math.log(info.tiny)) - 1)  # with a factor e to spare


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
    similarities, which the block shapes change in the last bit): bank images tied at the k-th place
    (duplicates) count in bank order, whatever the pieces.
    Returns {k: scores [n, num_classes]}, float64 if either feature set is float64 else float32.
    """
    ks = sorted(set(int(k) for k in ks))
    n_train, n_test = train_features.shape[0], test_features.shape[0]
    if not ks or ks[0] < 1 or ks[-1] > n_train:
        raise ValueError(f"every k must be between 1 and the {n_train} train images; got {ks}.")
    k_max = ks[-1]
    device = test_features.device
    dtype = torch.float64 if torch.float64 in (train_features.dtype, test_features.dtype) else torch.float32
    if not temperature >= lowest_temperature(k_max, dtype):
        raise ValueError(f"temperature {temperature:g} is below {lowest_temperature(k_max, dtype):.4g}, where the "
                         f"vote weights exp(s / T) of {k_max} neighbours leave the range of {dtype}.")
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
            sim, idx = nearest_in_bank_order(queries[rows] @ piece.T, k_max)
            # Merged by a stable sort: among equal similarities the earlier pieces' first, then this one's in
            # bank order.
            sim, order = torch.cat([top_sim[rows], sim], dim=1).sort(dim=1, descending=True, stable=True)
            top_sim[rows] = sim[:, :k_max]
            top_idx[rows] = torch.cat([top_idx[rows], idx + start], dim=1).gather(1, order[:, :k_max])

    weights = (top_sim / temperature).exp()
    neighbour_labels = train_labels.to(device)[top_idx]
    return {k: torch.zeros(n_test, num_classes, dtype=dtype, device=device)
            .scatter_add_(1, neighbour_labels[:, :k], weights[:, :k]) for k in ks}


def nearest_in_bank_order(sim, k):
    """(similarities, column indices) of the k largest entries of each row of sim, in column (bank) order;
    of entries tied at the k-th place (duplicate images) the first columns, so that no piece or block shape
    decides which of them count."""
    if k >= sim.shape[1]:  # a piece of at most k images: all of them
        return sim, torch.arange(sim.shape[1], device=sim.device).expand_as(sim)
    top, idx = sim.topk(k + 1, dim=1)  # one more, to see whether the k-th place is tied across the cut
    if (top[:, k - 1] == top[:, k]).any():
        idx = sim.sort(dim=1, descending=True, stable=True).indices  # stable: the first of equals first
    idx = idx[:, :k].sort(dim=1).values
    return sim.gather(1, idx), idx


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


@torch.no_grad()
def extract_features(net, crops, env, batch_size, workers, amp, channels_last, out_device, progress=None, then=0):
    """Features [len(crops), d] float32 of a data set of (image tensor, label, "path: why" or "") such as
    mdra.CentreCrops, on out_device, net in its current mode. An unreadable image stops the evaluation,
    as skipping it would change the bank or the accuracy's denominator. Returns an empty [0, 0] tensor
    for an empty shard (gather_rows fills in the width).
    progress: a name to report rank 0's progress under, every tenth of its shard, with an eta that
    counts `then` more images to extract after these at the same speed (the val split after the bank)."""
    loader = runtime.data_loader(crops, batch_size, workers, env.device, persistent=False,
                                 generator=torch.Generator().manual_seed(0))  # its seed draw must not touch the global RNG
    autocast = runtime.autocast(env.device, amp)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    features, done, tic, report_every = None, 0, time.perf_counter(), max(1, len(loader) // 10)
    unreadable = None
    for i, (x, _, failed) in enumerate(loader):
        unreadable = next((why for why in failed if why), None)
        if unreadable:  # the other ranks hear of it once through their shares (raise_together, below)
            break
        x = x.to(env.device, non_blocking=True, memory_format=memory_format)
        with autocast:
            batch = net(x)
        if features is None:  # filled in place: concatenating batches would hold the features twice
            features = torch.empty(len(crops), batch.shape[1], device=out_device)
        features[done:done + len(batch)] = batch
        done += len(batch)
        if progress and env.is_main and (i + 1) % report_every == 0:
            elapsed = time.perf_counter() - tic
            eta = datetime.timedelta(seconds=round(elapsed / done * (len(crops) - done + then)))
            print(f"{progress}: {done}/{len(crops)} images of rank 0 in {elapsed:.0f} s, eta {eta}"
                  + (f" (with {then} more images to come)" if then else ""), flush=True)
    error = UsageError(f"cannot read {unreadable}; an evaluation needs every image: remove or replace it.") \
        if unreadable else None
    runtime.raise_together(error, env, "another rank cannot read an image (its error names it); an evaluation "
                                       "needs every image.")
    return features if features is not None else torch.zeros(0, 0, device=out_device)


def gather_rows(local, env, chunk_mb=DEFAULT_CHUNK_MB):
    """Every rank's rows in rank order, on every rank, on local's device.

    Shards may differ in size (or be empty): the sizes are exchanged first, each rank pads its shard
    to the largest and the padding is cut off again, so each image appears exactly once. The exchange
    runs through env.device (NCCL needs the GPU) in pieces gathered into one tensor of at most chunk_mb
    from all ranks together (a list all_gather would allocate as much again inside NCCL, per rank), so
    a bank kept in host memory never has to fit on the GPU whole, whatever the number of ranks.
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
    piece = max(1, int(chunk_mb * 2**20) // (4 * width * env.world_size))  # rows per rank and exchange
    for start in range(0, max(sizes), piece):
        rows = min(piece, max(sizes) - start)
        block = torch.zeros(rows, width, device=env.device)
        mine = local[start:start + rows]
        if len(mine):  # an empty shard has no width to copy
            block[:len(mine)] = mine
        parts = torch.empty(env.world_size * rows, width, device=env.device)  # rank r's rows at r * rows
        all_gather_single(parts, block)
        for r, part in enumerate(parts.view(env.world_size, rows, width)):
            real = max(0, min(rows, sizes[r] - start))
            out[offsets[r] + start:offsets[r] + start + real] = part[:real]
    return out


# Every rank's tensor of one size into one output tensor (all_gather_into_tensor before torch 2.14's name).
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def bank_subset(n, size, seed):
    """Sorted indices of the bank's train images: `size` of the n drawn with seed, or all of them for 0
    (or size >= n). The monitor's --knn-subset and eval_knn.py's draw the same with the same seed."""
    if 0 < size < n:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values
    return torch.arange(n)


# ------------------------------------------------------------------------------------------------
# The monitor of mdra.py --knn-every
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def monitor_datasets(data_name, data_dir, img_size):
    """Built once per run: listing an ImageFolder of a million files takes a while."""
    bank_images, info = data.build_dataset(data_name, data_dir, "train", img_size)
    query_images, _ = data.build_dataset(data_name, data_dir, "val", img_size)
    return bank_images, query_images, info


def require_monitor_data(args):
    """One sentence before training, rather than after its first epoch, if the monitor cannot run."""
    _, _, info = monitor_datasets(args.data, args.data_dir, args.img_size)
    runtime.require_two_classes(info.num_classes, args.data, "--knn-every's kNN monitor",
                                " (pretraining itself needs no labels: leave --knn-every out)")


def monitor(backbone, args, env):
    """Weighted kNN (k = MONITOR_K, or the bank size if smaller) of the backbone during pretraining:
    {"top1@20": %, "top5@20": %}.

    args: mdra.py's resolved arguments (data, data_dir, img_size, knn_subset, batch_size, workers, amp,
    channels_last, seed); env: its runtime.DistEnv. Every rank must call it, and every rank evaluates rank
    0's network. The bank is --knn-subset train images (a subset seeded by --seed, or all) kept in host
    memory, so it never competes with training for GPU memory. The backbone runs in eval mode (BatchNorm
    running statistics, which it therefore does not update) and gets its modes back; the random generators
    are left as they were, so training continues exactly as without the monitor.
    """
    if env.world_size > 1:  # rank 0's BatchNorm statistics, as it saves them, everywhere
        runtime.broadcast_buffers(backbone)
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):  # training's untouched
        return monitor_votes(backbone, args, env)


def monitor_votes(backbone, args, env):
    bank_images, query_images, info = monitor_datasets(args.data, args.data_dir, args.img_size)
    bank_indices = bank_subset(len(bank_images), args.knn_subset, args.seed)
    k = min(MONITOR_K, len(bank_indices))  # a monitor must not end a training run over a tiny bank
    query_indices = torch.arange(len(query_images))[shard(len(query_images), env)]
    transform = data.eval_transform(args.img_size, data.eval_resize(info, args.img_size), info.mean, info.std)
    extract = functools.partial(extract_features, backbone, env=env, batch_size=max(1, args.batch_size // env.world_size),
                                workers=args.workers, amp=args.amp, channels_last=args.channels_last)
    modes = [(module, module.training) for module in backbone.modules()]
    backbone.eval()
    try:
        bank_shard = bank_indices[shard(len(bank_indices), env)].tolist()
        bank = gather_rows(extract(data.CentreCrops(Subset(bank_images, bank_shard), transform), out_device="cpu"), env)
        queries = extract(data.CentreCrops(Subset(query_images, query_indices.tolist()), transform),
                          out_device=env.device)
    finally:
        for module, training in modes:
            module.training = training
    bank_labels = torch.tensor(bank_images.targets)[bank_indices]
    query_labels = torch.tensor(query_images.targets)[query_indices]
    (top1, top5), = knn_accuracy(bank, bank_labels, queries, query_labels, info.num_classes, [k], 0.07,
                                 DEFAULT_CHUNK_MB, env).values()
    return {f"top1@{k}": top1, f"top5@{k}": top5}
