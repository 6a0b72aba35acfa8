"""Time eval_knn's weighted kNN against a DINO-style one on the same synthetic bank, in one run.

DINO-style (the loop of DINO's eval_knn.py, written out below): for every k, the similarity of each
of a fixed 100 chunks of queries to the whole bank is recomputed, and the votes go through a one-hot
tensor. eval_knn: one top-k search for the largest k serves every k, in blocks sized by a memory budget.

    python benchmarks/bench_knn.py                 # CPU, scaled down: 40,000 x 512 bank, 2,000 queries
    python benchmarks/bench_knn.py --device cuda   # ImageNet size: 1,281,167 x 2048 bank, 50,000 queries,
                                                   # also with the bank in host memory (about 2 minutes on an H100)
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import knn  # noqa: E402  (the repository root is not on the path of a script in benchmarks/)

SIZES = {"cpu": dict(bank=40_000, queries=2_000, dim=512, classes=100),
         "cuda": dict(bank=1_281_167, queries=50_000, dim=2048, classes=1000)}


def synthetic_features(n, dim, centres, noise, generator, device):
    """Class centre plus Gaussian noise, written piece by piece so no second copy of the bank exists."""
    labels = torch.randint(0, centres.shape[0], (n,), generator=generator, device=device)
    features = torch.randn(n, dim, generator=generator, device=device).mul_(noise)
    for start in range(0, n, 65536):
        features[start:start + 65536] += centres[labels[start:start + 65536]]
    return features, labels


def dino_style_knn(train_features, train_labels, test_features, test_labels, k, temperature, num_classes):
    """DINO's weighted kNN for one k: features already L2-normalised, 100 chunks of queries, the full
    similarity to the bank per chunk, votes through a one-hot [chunk * k, classes] tensor.
    Returns the numbers of top-1 and top-5 hits."""
    bank_t = train_features.t()
    n = test_features.shape[0]
    chunk = n // 100
    top1 = top5 = 0
    for start in range(0, n, chunk):
        queries, targets = test_features[start:start + chunk], test_labels[start:start + chunk]
        rows = queries.shape[0]
        similarity, indices = (queries @ bank_t).topk(k, dim=1, largest=True, sorted=True)
        neighbours = train_labels.view(1, -1).expand(rows, -1).gather(1, indices)
        one_hot = torch.zeros(rows * k, num_classes, device=queries.device)
        one_hot.scatter_(1, neighbours.view(-1, 1), 1)
        weights = similarity.div(temperature).exp()
        probs = (one_hot.view(rows, k, num_classes) * weights.view(rows, k, 1)).sum(dim=1)
        predictions = probs.argsort(dim=1, descending=True)
        correct = predictions.eq(targets.view(-1, 1))
        top1 += correct[:, :1].sum().item()
        top5 += correct[:, :min(5, k)].sum().item()
    return top1, top5


def run_timed(fn, device):
    """(result, seconds, peak memory beyond what was allocated before, GiB; None on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    tic = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - tic
    extra = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if device.type == "cuda" else None
    return result, seconds, extra


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bank", type=int, default=None, help="train images; default: 40,000 (cpu) or 1,281,167 (cuda)")
    p.add_argument("--queries", type=int, default=None, help="test images; default: 2,000 (cpu) or 50,000 (cuda)")
    p.add_argument("--dim", type=int, default=None, help="feature width; default: 512 (cpu) or 2048 (cuda)")
    p.add_argument("--classes", type=int, default=None, help="default: 100 (cpu) or 1000 (cuda)")
    p.add_argument("--k", type=int, nargs="+", default=list(knn.DEFAULT_KS))
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--chunk-mb", type=float, default=knn.DEFAULT_CHUNK_MB, help="eval_knn's memory budget")
    p.add_argument("--noise", type=float, default=5.0, help="noise around the class centres (sets the accuracy)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_knn.py: error: --device cuda was given but no CUDA GPU is available.")
    for name, value in SIZES[args.device].items():
        setattr(args, name, getattr(args, name) or value)
    if args.queries < 100:
        sys.exit("bench_knn.py: error: the DINO-style loop needs at least 100 queries (it makes 100 chunks).")
    device = torch.device(args.device)

    g = torch.Generator(device).manual_seed(0)
    centres = torch.randn(args.classes, args.dim, generator=g, device=device)
    bank, bank_labels = synthetic_features(args.bank, args.dim, centres, args.noise, g, device)
    queries, query_labels = synthetic_features(args.queries, args.dim, centres, args.noise, g, device)
    ks = sorted(args.k)

    def ours(bank):
        votes = knn.weighted_knn_votes(bank, bank_labels, queries, args.classes, ks, args.temperature,
                                       args.chunk_mb)
        return [knn.count_correct(votes[k], query_labels)[1] for k in ks]

    def dino_style():  # DINO normalises once, when it extracts the features: not timed
        return [dino_style_knn(bank_unit, bank_labels, queries_unit, query_labels, k, args.temperature,
                               args.classes)[0] for k in ks]

    # Warm-up (kernel selection, allocator) on a slice, so that neither timing pays for it.
    knn.weighted_knn_votes(bank[:10_000], bank_labels[:10_000], queries[:1000], args.classes, ks)
    dino_style_knn(F.normalize(bank[:10_000], dim=1), bank_labels[:10_000], F.normalize(queries[:1000], dim=1),
                   query_labels[:1000], max(ks), args.temperature, args.classes)

    rows = [("eval_knn, bank on " + args.device, *run_timed(lambda: ours(bank), device))]
    if device.type == "cuda":
        bank_host = bank.cpu()
        rows.append(("eval_knn, bank in host memory", *run_timed(lambda: ours(bank_host), device)))
        del bank_host
    bank_unit, queries_unit = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    rows.append(("DINO-style, per k, 100 chunks", *run_timed(dino_style, device)))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"weighted kNN | bank {args.bank} x {args.dim} | {args.queries} queries | {args.classes} classes | "
          f"k {' '.join(map(str, ks))} | {name} ({torch.get_num_threads()} threads) | torch {torch.__version__}")
    dino_seconds = rows[-1][2]
    print(f"{'implementation':<32} {'time (s)':>9} {'speed-up':>9} {'extra GiB':>10}   top-1 % for k = "
          + "/".join(map(str, ks)))
    for label, hits, seconds, extra in rows:
        print(f"{label:<32} {seconds:>9.2f} {dino_seconds / seconds:>8.2f}x "
              f"{'-' if extra is None else f'{extra:.2f}':>10}   "
              + "/".join(f"{100 * h / args.queries:.2f}" for h in hits))


if __name__ == "__main__":
    main()
