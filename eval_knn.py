"""Weighted k-nearest-neighbour evaluation of a representation (MDRA_SPEC.md section 7).

Backbone features (after global pooling, centre crop, no augmentation) of the train split form the
bank, those of the val/test split are the queries; each query takes the k most cosine-similar bank
images, which vote for their class with weight exp(s / T), T = 0.07. Reported: top-1 and top-5 for
k in 10 20 100 200, all from one top-k search. The protocol is DINO's eval_knn.py; unlike it, the
checkpoint is loaded strictly, shards are gathered without padded duplicates, the similarity is
chunked by a memory budget, and the bank may live in host memory. The vote and the feature extraction
are knn.py's, which mdra.py's in-training monitor (--knn-every) uses too.

Launch:
    python eval_knn.py --ckpt runs/mdra/checkpoint.pth                    # data set, arch, size: the checkpoint's
    python eval_knn.py --ckpt runs/mdra/checkpoint.pth --random-init      # baseline: same network, untrained
    python eval_knn.py --ckpt runs/mdra/checkpoint.pth --pixels           # baseline: raw pixels as features
    torchrun --nproc_per_node=8 eval_knn.py --ckpt runs/mdra/checkpoint.pth --data /path/to/imagenet
    python eval_knn.py --ckpt ... --bank-device cpu                       # bank in host memory, streamed to the GPU
    python eval_knn.py --ckpt ... --holdout 10000                         # queries: train images the bank leaves out

The results go to knn.json next to the checkpoint (or --out). With --holdout the queries are training
images, so that settings are chosen without the test split (knn_held-out.json).
"""
import argparse
import functools
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import Subset

import data
import knn
import mdra
import runtime
from runtime import UsageError
from knn import weighted_knn  # noqa: F401  (spec section 9 names it eval_knn.weighted_knn)


# ------------------------------------------------------------------------------------------------
# The evaluation script
# ------------------------------------------------------------------------------------------------

def feature_network(args, ckpt, info):
    """The network whose outputs are the features, and a description of it for the report."""
    if args.pixels:
        return nn.Flatten(), f"raw pixels ({3 * args.img_size ** 2}-d)"
    if ckpt:
        runtime.require_keys(ckpt, args.ckpt, runtime.BACKBONE_KEYS, "mdra.py or finetune.py")
    arch = args.arch or (ckpt["arch"] if ckpt else "resnet50")
    small_stem = ckpt["small_stem"] if ckpt else (info.small or args.img_size <= 64)
    mdra.require_img_size(args.img_size, small_stem)
    torch.manual_seed(args.seed)  # --random-init: the same untrained weights on every rank
    backbone, _ = mdra.build_backbone(arch, small_stem)
    if args.random_init:
        return backbone, f"{arch}, random init (seed {args.seed})"
    runtime.load_strict(backbone, ckpt["backbone"], f"the backbone in {args.ckpt} (a {ckpt['arch']}) for --arch {arch}")
    return backbone, f"{arch} from {args.ckpt} (epoch {ckpt.get('epoch')}, step {ckpt.get('step')})"


def features_from_images(args, env, bank_device):
    """(bank, bank labels, this rank's queries, all query labels, classes, description) from a network."""
    if not (args.ckpt or args.random_init or args.pixels):
        raise UsageError("give --ckpt, or --random-init or --pixels for a baseline, or --load-features.")
    ckpt = runtime.load_checkpoint(args.ckpt, formats=("mdra", "mdra-classifier")) if args.ckpt else None
    saved = ckpt.get("args", {}) if ckpt else {}
    for name, default in runtime.DATA_DEFAULTS.items():
        given = getattr(args, name)  # None where left out: 0 or "" given is checked as given
        setattr(args, name, given if given is not None else saved.get(name) or default)
    args.img_size = args.img_size or (ckpt.get("img_size") if ckpt else None) or saved.get("img_size")
    bank_images, info = data.build_dataset(args.data, args.data_dir, "train", args.img_size or 32)
    runtime.require_two_classes(info.num_classes, args.data, "a kNN evaluation")
    bank_targets = torch.tensor(bank_images.targets)
    if args.holdout:  # the queries are training images that the bank leaves out, not the val split
        held_out = data.held_out_subset(bank_targets, [], args.holdout, args.seed)
        query_images, query_targets = Subset(bank_images, held_out), bank_targets[held_out]
        candidates = data.other_indices(len(bank_images), held_out)
    else:
        query_images, _ = data.build_dataset(args.data, args.data_dir, "val", args.img_size or 32)
        query_targets, candidates = torch.tensor(query_images.targets), torch.arange(len(bank_images))
    args.img_size = args.img_size or info.native_size
    bank_indices = candidates[knn.bank_subset(len(candidates), args.knn_subset, args.seed)]
    check_k(args.k, len(bank_indices))  # before the long part

    net, description = feature_network(args, ckpt, info)
    if len(bank_indices) < len(candidates):
        description += f", bank of {len(bank_indices)} of the {len(candidates)} train images (seed {args.seed})"
    if args.holdout:
        description += f", queries {args.holdout} train images held out of the bank (seed {args.seed})"
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    net.to(env.device, memory_format=memory_format).eval()
    transform = data.eval_transform(args.img_size, data.eval_resize(info, args.img_size), info.mean, info.std)
    extract = functools.partial(knn.extract_features, net, env=env, batch_size=args.batch_size, workers=args.workers,
                                amp=args.amp, channels_last=args.channels_last)
    bank_shard = bank_indices[knn.shard(len(bank_indices), env)].tolist()
    query_shard = list(range(len(query_images))[knn.shard(len(query_images), env)])
    bank = knn.gather_rows(extract(data.CentreCrops(Subset(bank_images, bank_shard), transform), out_device=bank_device,
                                   progress="train", then=len(query_shard)), env, args.chunk_mb)
    queries = extract(data.CentreCrops(Subset(query_images, query_shard), transform), out_device=env.device,
                      progress="held-out" if args.holdout else "val")
    return bank, bank_targets[bank_indices], queries, query_targets, info.num_classes, description


def load_features(directory, env, bank_device):
    """The files of --save-features: (bank, labels, this rank's queries, all query labels, classes, description)."""
    parts = []
    for name in ("train", "val"):
        path = Path(directory) / f"{name}.pth"
        part = read_feature_file(path)
        if isinstance(part, str):
            raise UsageError(f"{path} is not a feature file written by --save-features ({part}).")
        parts.append(part)
    train, val = parts
    if train["description"] != val["description"] or train["num_classes"] != val["num_classes"]:
        raise UsageError(f"{directory}'s train.pth and val.pth come from different features "
                         f"({train['description']}; {val['description']}).")
    queries = val["features"][knn.shard(len(val["labels"]), env)].to(env.device)
    return (train["features"].to(bank_device), train["labels"], queries, val["labels"], train["num_classes"],
            f"{train['description']}, loaded from {directory}")


def read_feature_file(path):
    """A file of --save-features as its dict, else why it is not one (a missing, truncated or foreign file)."""
    try:
        part = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        return type(e).__name__
    keys = {"features", "labels", "num_classes", "description"}
    return part if isinstance(part, dict) and keys <= part.keys() else "other contents"


def save_features(directory, bank, bank_labels, queries, query_labels, num_classes, description):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, features, labels in (("train", bank, bank_labels), ("val", queries, query_labels)):
        runtime.save_checkpoint({"features": features.cpu(), "labels": labels.cpu(), "num_classes": num_classes,
                                 "description": description}, directory / f"{name}.pth")


def check_k(ks, n_train):
    if max(ks) > n_train:
        raise UsageError(f"--k {max(ks)} is more than the {n_train} train images in the bank.")


def default_out(args):
    name = "knn_random-init" if args.random_init else "knn_pixels" if args.pixels else "knn"
    name += "_held-out.json" if args.holdout else ".json"
    if args.ckpt:
        return Path(args.ckpt).parent / name
    return Path(args.load_features or "runs") / name


def is_result(path):
    """Whether path holds a result this script wrote (report): a JSON object of its features and results."""
    try:
        record = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(record, dict) and {"features", "results"} <= record.keys()


def check_outputs(args):
    """Where the results (and --save-features' files) will go, checked before the work: over nothing but what
    this script wrote, never over one of its inputs, never among the user's images. Returns the --out path."""
    out = Path(args.out) if args.out else default_out(args)
    if args.out and out.is_dir():
        raise UsageError(f"--out {args.out} is a folder; give a file name, e.g. {out / 'knn.json'}.")
    images = data.image_folder_root(args.data)
    saved = [Path(args.load_features) / f"{name}.pth" for name in ("train", "val")] if args.load_features else []
    inputs = [args.ckpt] * bool(args.ckpt) + saved
    runtime.require_outside(out, images, "--out")
    runtime.require_replaceable(out, "--out", is_result, "a kNN result of eval_knn.py", inputs)
    if args.out or out.parent.exists() or not (args.ckpt or args.load_features):  # not the folder of a mistyped input
        runtime.require_folder(out.parent, "--out's folder" if args.out else "the default --out's folder")
    if args.save_features:
        runtime.require_outside(args.save_features, images, "--save-features")
        runtime.require_folder(args.save_features, "--save-features")
        for name in ("train", "val"):
            runtime.require_replaceable(Path(args.save_features) / f"{name}.pth", "--save-features'",
                                        lambda path: not isinstance(read_feature_file(path), str),
                                        "a feature file of eval_knn.py", inputs)
    return out


def evaluate(args):
    env = runtime.setup_distributed(args.device)
    cuda = env.device.type == "cuda"
    runtime.resolve_speed_flags(args, env)
    if args.bank_device == "cuda" and not cuda:
        raise UsageError("--bank-device cuda needs the evaluation itself on a GPU (--device cuda).")
    bank_device = torch.device("cpu") if args.bank_device == "cpu" else env.device
    check_outputs(args)  # now: the results are written after all the work
    if args.load_features:  # what made the features is in the folder; these would only mislabel the results
        given = [f"--{name.replace('_', '-')}" for name in ("ckpt", "arch", "random_init", "pixels", "data", "img_size",
                                                             "knn_subset", "holdout") if getattr(args, name)]
        if given:
            raise UsageError(f"--load-features takes the features from its folder; {', '.join(given)} would "
                             "not change them, so leave them out.")
    if args.temperature <= 0 or args.chunk_mb <= 0 or min(args.k) < 1:
        raise UsageError("--temperature and --chunk-mb must be positive and every --k at least 1.")
    lowest = knn.lowest_temperature(max(args.k))  # the features are float32
    if args.temperature < lowest:
        raise UsageError(f"--temperature {args.temperature:g} is below {lowest:.4g}, where the vote weights "
                         f"exp(similarity / T) of {max(args.k)} neighbours overflow or vanish in float32.")
    runtime.require_at_least(1, args, "batch_size")
    runtime.require_at_least(0, args, "workers", "knn_subset", "holdout")

    if env.is_main:
        print(f"eval_knn.py git {runtime.git_sha()} | world size {env.world_size} | device {env.device}"
              f"{' (' + torch.cuda.get_device_name(env.device) + ')' if cuda else ''} | torch {torch.__version__}")
        print("args " + json.dumps(vars(args)), flush=True)
    tic = time.perf_counter()
    if args.load_features:
        found = load_features(args.load_features, env, bank_device)
    else:
        found = features_from_images(args, env, bank_device)
    bank, bank_labels, queries, query_labels, num_classes, description = found
    all_queries = knn.gather_rows(queries, env, args.chunk_mb) if args.save_features else None
    extract_s = time.perf_counter() - tic
    check_k(args.k, bank.shape[0])

    tic = time.perf_counter()
    results = knn.knn_accuracy(bank, bank_labels, queries, query_labels[knn.shard(len(query_labels), env)],
                               num_classes, args.k, args.temperature, args.chunk_mb, env)
    knn_s = time.perf_counter() - tic
    if env.is_main:
        report(args, env, description, bank.shape, len(query_labels), num_classes, results, extract_s, knn_s)
        if args.save_features:  # last: no rank waits in a collective while rank 0 writes (gigabytes for ImageNet)
            save_features(args.save_features, bank, bank_labels, all_queries, query_labels, num_classes, description)
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
              "n_train": bank_shape[0], "knn_subset": args.knn_subset, "n_test": n_queries,
              "eval": "held-out" if args.holdout else "val", "num_classes": num_classes,
              "temperature": args.temperature, "git": runtime.git_sha(), "world_size": env.world_size,
              "results": {str(k): {"top1": top1, "top5": top5} for k, (top1, top5) in results.items()}}
    text = json.dumps(record, indent=1) + "\n"
    with runtime.atomic_file(out, len(text.encode())) as tmp:
        tmp.write_text(text)
    print(f"written to {out}")


def get_parser():
    p = argparse.ArgumentParser(
        prog="eval_knn.py", description="Weighted kNN evaluation of an MDRA checkpoint (spec section 7).",
        formatter_class=runtime.HelpFormatter)
    a = p.add_argument
    a("--ckpt", help="checkpoint of mdra.py (format 'mdra') or finetune.py ('mdra-classifier')")
    baseline = p.add_mutually_exclusive_group()
    baseline.add_argument("--random-init", action="store_true",
                          help="baseline: the same architecture untrained (seeded by --seed): what pretraining bought")
    baseline.add_argument("--pixels", action="store_true", help="baseline: the normalised pixels as features")
    a("--k", type=int, nargs="+", default=list(knn.DEFAULT_KS), help="numbers of neighbours; all share one top-k search")
    a("--knn-subset", type=int, default=0, metavar="N",
      help="a bank of N train images drawn with --seed (0: all), as mdra.py --knn-subset N draws its monitor's with "
           "the same --seed: fewer features to extract, e.g. on a CPU")
    a("--holdout", type=int, default=0, metavar="N",
      help="query N training images, which the bank leaves out (the same share of every class, drawn with --seed: "
           "those finetune.py --holdout N holds out of all labels), instead of the val split: for choosing "
           "pretraining settings without the test split; the results go to knn_held-out.json by default")
    a("--temperature", type=runtime.finite_float, default=0.07, help="T of the vote weight exp(similarity / T)")
    a("--batch-size", type=int, default=256, help="images per forward pass on each rank")
    a("--bank-device", default="auto", choices=["auto", "cpu", "cuda"],
      help="where the train features live: auto is --device; cpu keeps them in host memory and streams pieces to the "
           "GPU (for banks larger than the GPU memory; slower by one host-to-GPU copy of the bank)")
    a("--chunk-mb", type=runtime.finite_float, default=knn.DEFAULT_CHUNK_MB,
      help="memory budget of one similarity block (and of one bank piece); the results do not depend on it")
    a("--save-features", default=None, metavar="DIR", help="also write the features to DIR/train.pth and DIR/val.pth")
    a("--load-features", default=None, metavar="DIR",
      help="vote on the features saved by --save-features instead of extracting them")
    a("--out", default=None, help="JSON file of the results; default: knn.json next to the checkpoint "
                                  "(knn_random-init.json, knn_pixels.json for the baselines; _held-out before .json "
                                  "with --holdout). It replaces an earlier result, never a file of another kind")
    mdra.add_network_flags(p, from_checkpoint=True)
    runtime.add_data_flags(p, data.SMALL_DATASETS, from_checkpoint=True)
    runtime.add_run_flags(p)
    return p


def main(argv=None):
    # An evaluation has nothing to save: SIGINT and SIGTERM end it at once (torchrun stops other ranks so).
    return runtime.run_main(evaluate, argv, get_parser(),
                            memory_flags="--batch-size or --chunk-mb, or keep the bank on the CPU (--bank-device cpu)")


if __name__ == "__main__":
    main()
