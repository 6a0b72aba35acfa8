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


def test_each_seed_and_epoch_has_an_order_of_its_own_and_epoch_0_keeps_the_order_of_earlier_versions():
    def order(seed, epoch):
        sampler = data.EpochSampler(64, global_batch=8, num_batches=8, world_size=1, rank=0, seed=seed)
        sampler.set_epoch(epoch)
        return tuple(i for _, i in sampler)

    # seed + epoch seeded earlier versions: seed 1 saw seed 0's orders an epoch later. Now no two pairs share one.
    pairs = [(seed, epoch) for seed in range(4) for epoch in range(6)] + [(2**32 - 1, 1), (1, 2**32 + 1)]
    assert len({order(*pair) for pair in pairs}) == len(pairs)
    assert order(3, 0) == tuple(torch.randperm(64, generator=torch.Generator().manual_seed(3)).tolist())
    assert order(3, 4) == tuple(np.random.default_rng([3, 4]).permutation(64).tolist())
