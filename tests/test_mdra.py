"""The method's pieces against independent references: loss, Sinkhorn, EMA, queue, LARS, schedule."""
import contextlib
import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torchvision

import data
import mdra


def reference_mdra_loss(q1, q2, k1, k2, queue, groups, tau, mu, iters, cross=True):
    """Spec sections 3-4 written out with loops and explicit formulas, in float64; iters = 0 and
    cross=False are the ablations without the balance constraint and without cross alignment."""
    q1, q2, k1, k2, queue = (x.double() for x in (q1, q2, k1, k2, queue))
    B, D = q1.shape
    N, d = queue.shape[0], D // groups
    total = 0.0
    for g in range(groups):
        def unit(x):
            x = x[:, g * d:(g + 1) * d]
            return x / x.norm(dim=1, keepdim=True)

        negatives = unit(queue)

        def online_relation(q):  # P[i, j] = exp(q_i.k_j / tau) / sum_j' exp(q_i.k_j' / tau)
            e = torch.exp(unit(q) @ negatives.T / tau)
            return e / e.sum(dim=1, keepdim=True)

        def offline_relation(k):
            e = torch.exp(unit(k) @ negatives.T / mu)
            if iters == 0:  # no balance constraint: R[i, j] = exp(K[i, j] / mu) / sum_j' exp(K[i, j'] / mu)
                return e / e.sum(dim=1, keepdim=True)
            for _ in range(iters):
                e = e / e.sum(dim=0, keepdim=True) / N
                e = e / e.sum(dim=1, keepdim=True) / B
            return e * B

        def cross_entropy(r, p):
            return -(r * torch.log(p)).sum() / B

        target1, target2 = (k2, k1) if cross else (k1, k2)  # whose offline relation each view is pulled to
        total = total + 0.5 * (cross_entropy(offline_relation(target1), online_relation(q1))
                               + cross_entropy(offline_relation(target2), online_relation(q2)))
    return total / groups


def random_inputs(B=12, D=256, N=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    q1, q2, k1, k2 = (torch.randn(B, D, generator=g) for _ in range(4))
    k2 = k2 + 0.5 * q1  # some structure, so the relations are not all alike
    queue = torch.randn(N, D, generator=g)
    return q1, q2, k1, k2, queue


@pytest.mark.parametrize("compiled", [False, True])  # --compile loss: the same loss as one traced graph
@pytest.mark.parametrize("groups, iters, cross", [(1, 3, True), (4, 3, True), (8, 3, True),
                                                   (4, 0, True), (4, 3, False)])  # the method, then two ablations
def test_loss_and_its_gradients_match_a_float64_reference(groups, iters, cross, compiled):
    q1, q2, k1, k2, queue = random_inputs()
    q1.requires_grad_(), q2.requires_grad_()
    loss_fn = torch.compile(mdra.mdra_loss, backend="aot_eager", fullgraph=True) if compiled else mdra.mdra_loss
    loss = loss_fn(q1, q2, k1, k2, queue, groups=groups, tau=0.04, mu=0.05, sinkhorn_iters=iters, cross=cross)
    loss.backward()

    r1, r2 = q1.detach().double().requires_grad_(), q2.detach().double().requires_grad_()
    ref = reference_mdra_loss(r1, r2, k1, k2, queue, groups, 0.04, 0.05, iters, cross)
    ref.backward()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(q1.grad.double(), r1.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(q2.grad.double(), r2.grad, rtol=1e-4, atol=1e-7)


def test_loss_is_computed_in_float32_under_bf16_autocast():
    q1, q2, k1, k2, queue = random_inputs()
    ref = mdra.mdra_loss(q1, q2, k1, k2, queue)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = mdra.mdra_loss(q1, q2, k1, k2, queue)
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(ref.item(), rel=1e-6)


def test_loss_gradient_reaches_only_the_online_predictions():
    q1, q2, k1, k2, queue = random_inputs()
    for t in (q1, q2, k1, k2, queue):
        t.requires_grad_()
    mdra.mdra_loss(q1, q2, k1, k2, queue).backward()
    assert q1.grad.abs().sum() > 0 and q2.grad.abs().sum() > 0
    assert k1.grad is None and k2.grad is None and queue.grad is None


def test_sinkhorn_rows_are_distributions_and_columns_balance():
    g = torch.Generator().manual_seed(1)
    scores = torch.nn.functional.normalize(torch.randn(16, 64, generator=g), dim=1)
    R = mdra.sinkhorn(scores, mu=0.05, iters=3)
    torch.testing.assert_close(R.sum(dim=1), torch.ones(16), rtol=0, atol=1e-5)
    assert (R >= 0).all()
    # Three iterations only approach the balance: the column sums are close to B/N, not equal to it.
    columns = R.sum(dim=0) / (16 / 64)
    assert (columns - 1).abs().max() < 0.1 and (columns - 1).abs().max() > 1e-3
    # With enough iterations the balance constraint holds too: every column carries B/N.
    R = mdra.sinkhorn(scores, mu=0.05, iters=200)
    torch.testing.assert_close(R.sum(dim=0), torch.full((64,), 16 / 64), rtol=1e-3, atol=0)


def test_sinkhorn_matches_float64_reference_and_ignores_extreme_scores():
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(3, 8, 32, generator=g) * 2 - 1  # a leading subspace dimension
    R = mdra.sinkhorn(scores, mu=0.05, iters=3)
    for s, r in zip(scores.double(), R):
        e = torch.exp(s / 0.05)
        for _ in range(3):
            e = e / e.sum(0) / 32
            e = e / e.sum(1, keepdim=True) / 8
        torch.testing.assert_close(r.double(), e * 8, rtol=1e-5, atol=1e-8)
    # Shifting all scores by a constant changes nothing: the max subtraction is only for overflow.
    torch.testing.assert_close(mdra.sinkhorn(scores + 30, mu=0.05, iters=3), R)


def test_sinkhorn_without_iterations_is_the_row_softmax_of_K_over_mu():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(2, 8, 32, generator=g) * 2 - 1
    R = mdra.sinkhorn(scores, mu=0.05, iters=0)
    e = torch.exp(scores.double() / 0.05)
    torch.testing.assert_close(R.double(), e / e.sum(dim=-1, keepdim=True), rtol=1e-5, atol=1e-8)
    # A small mu does not overflow: exp(1 / 0.005) is beyond float32.
    sharp = mdra.sinkhorn(scores, mu=0.005, iters=0)
    torch.testing.assert_close(sharp.sum(dim=-1), torch.ones(2, 8), rtol=0, atol=1e-5)


def test_online_branch_without_predictor_is_the_encoder_and_saves_no_predictor_keys():
    torch.manual_seed(0)
    online, _, _ = mdra.build_model("resnet10-w8", small_stem=True, predictor=False, hidden_dim=32)
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    q1, q2 = online(x1, x2)
    assert torch.equal(q1, online.encoder(x1)) and torch.equal(q2, online.encoder(x2))
    assert not any(k.startswith("predictor.") for k in online.state_dict())
    default, _, _ = mdra.build_model("resnet10-w8", small_stem=True, hidden_dim=32)
    assert any(k.startswith("predictor.") for k in default.state_dict())


def test_loss_of_a_batch_split_over_two_gloo_ranks_equals_the_single_process_loss(tmp_path, gloo_ranks):
    q1, q2, k1, k2, queue = random_inputs(B=16, N=64, seed=3)
    torch.save({"q1": q1, "q2": q2, "k1": k1, "k2": k2, "queue": queue}, tmp_path / "inputs.pt")
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import sys, torch, torch.distributed as dist, mdra\n"
        "dist.init_process_group('gloo')\n"
        "r, w = dist.get_rank(), dist.get_world_size()\n"
        "x = torch.load(sys.argv[1], weights_only=True)\n"
        "b = x['q1'].shape[0] // w\n"
        "rows = slice(r * b, (r + 1) * b)\n"
        "out = {}\n"
        "for name, loss_fn in (('eager', mdra.mdra_loss),  # and --compile loss: Sinkhorn's all-reduces in its graph\n"
        "                      ('compiled', torch.compile(mdra.mdra_loss, backend='aot_eager', fullgraph=True))):\n"
        "    q1, q2 = (x[k][rows].clone().requires_grad_() for k in ('q1', 'q2'))\n"
        "    loss = loss_fn(q1, q2, x['k1'][rows], x['k2'][rows], x['queue'])\n"
        "    loss.backward()\n"
        "    out[name] = {'loss': loss.detach(), 'g1': q1.grad, 'g2': q2.grad}\n"
        "out['R'] = mdra.sinkhorn(x['k1'][rows] @ x['queue'].T / 100, 0.05, 3)\n"
        "torch.save(out, f'{sys.argv[2]}/rank{r}.pt')\n"
        "dist.destroy_process_group()\n")
    gloo_ranks([worker, tmp_path / "inputs.pt", tmp_path], 2).wait()
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    q1.requires_grad_(), q2.requires_grad_()
    loss = mdra.mdra_loss(q1, q2, k1, k2, queue)
    loss.backward()
    # The global loss is the mean of the rank-local means; DDP averages gradients over ranks, so a
    # rank's row gradient divided by the world size equals the single-process row gradient.
    for name in ("eager", "compiled"):
        ranks = [p[name] for p in parts]
        assert ((ranks[0]["loss"] + ranks[1]["loss"]) / 2).item() == pytest.approx(loss.item(), rel=1e-6), name
        torch.testing.assert_close(torch.cat([p["g1"] for p in ranks]) / 2, q1.grad, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(torch.cat([p["g2"] for p in ranks]) / 2, q2.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(torch.cat([p["R"] for p in parts]), mdra.sinkhorn(k1 @ queue.T / 100, 0.05, 3))


def test_two_gloo_ranks_raise_one_ranks_error_together_gather_uneven_shards_and_agree_on_what_they_resumed(
        tmp_path, gloo_ranks):
    # Rank 0 alone writes the checkpoint and takes the --out-dir lock; each rank reads its own share of a
    # kNN evaluation. A UsageError of one rank is raised by all, so that none waits in a collective for it.
    # Then the shares are gathered in pieces (knn.gather_rows), and the ranks compare what they resumed.
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import sys, torch, torch.distributed as dist, knn, runtime\n"
        "env = runtime.setup_distributed('cpu')\n"
        "def attempt(fn):\n"
        "    try:\n"
        "        fn()\n"
        "        return 'ok'\n"
        "    except runtime.UsageError as e:\n"
        "        return str(e)\n"
        "def full():\n"
        "    raise runtime.UsageError('the disk is full')\n"
        "class Crops(torch.utils.data.Dataset):  # as mdra.CentreCrops yields: image, label, 'path: why' or ''\n"
        "    def __len__(self):\n"
        "        return 4\n"
        "    def __getitem__(self, i):\n"
        "        return torch.zeros(3, 2, 2), 0, 'x.jpg: corrupt' if env.rank == 1 and i == 2 else ''\n"
        "results = [attempt(lambda: runtime.on_main_rank(env, 'write it', full)),\n"
        "           attempt(lambda: runtime.on_main_rank(env, 'write it', lambda: None)),\n"
        "           attempt(lambda: knn.extract_features(torch.nn.Flatten(), Crops(), env, 2, 0, 'off', False,\n"
        "                                                'cpu')),\n"
        "           str(runtime.all_reduce(torch.ones(())).item())]  # and both still meet in a collective\n"
        "# gather_rows in pieces of one row per rank (uneven shards), and with an empty shard of no width\n"
        "first, count = 100 * env.rank, 5 if env.rank == 0 else 3\n"
        "rows = torch.arange(first, first + count).float()[:, None].repeat(1, 4)\n"
        "results.append(str(knn.gather_rows(rows, env, chunk_mb=2 * 16 / 2**20)[:, 0].tolist()))\n"
        "rows = rows[:2] if env.rank == 0 else torch.zeros(0, 0)\n"
        "results.append(str(knn.gather_rows(rows, env, chunk_mb=2 * 16 / 2**20).tolist()))\n"
        "def same(step, names):\n"
        "    state = runtime.resumed_state(step, runtime.data_fingerprint(names))\n"
        "    return attempt(lambda: runtime.require_same_on_every_rank(env, state))\n"
        "results.append(same(4, ['a', 'b']))\n"
        "results.append(same(4 + env.rank, ['a', 'c'] if env.rank else ['a', 'b']))  # a data copy of its own\n"
        "open(f'{sys.argv[1]}/rank{env.rank}', 'w').write('\\n'.join(results))\n"
        "dist.destroy_process_group()\n")
    gloo_ranks([worker, tmp_path], 2).wait()
    rank0, rank1 = ((tmp_path / f"rank{r}").read_text().splitlines() for r in range(2))
    assert rank0[:2] == ["the disk is full", "ok"]
    assert rank1[:2] == ["rank 0 could not write it (its error says why).", "ok"]
    assert rank1[2].startswith("cannot read x.jpg: corrupt; an evaluation needs every image")
    assert rank0[2].startswith("another rank cannot read an image")
    assert rank0[3] == rank1[3] == "2.0"
    assert rank0[4] == rank1[4] == str([0.0, 1.0, 2.0, 3.0, 4.0, 100.0, 101.0, 102.0])
    assert rank0[5] == rank1[5] == str([[0.0] * 4, [1.0] * 4])
    assert rank0[6] == rank1[6] == "ok"  # the same step and images after resuming
    assert rank0[7] == rank1[7] == ("the ranks differ in the step resumed from and the images' names: every rank must "
                                    "read the same --out-dir and the same data (on several nodes, from a file system "
                                    "they share).")


def tiny_model():
    online, offline, width = mdra.build_model("resnet10-w8", small_stem=True, hidden_dim=32)
    return online, offline


def test_offline_branch_starts_equal_gets_no_gradients_and_moves_by_ema():
    torch.manual_seed(0)
    online, offline = tiny_model()
    for p_on, p_off in zip(online.encoder.parameters(), offline.parameters()):
        assert torch.equal(p_on, p_off) and not p_off.requires_grad
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    q1, q2 = online(x1, x2)
    k1, k2 = offline(x1), offline(x2)
    mdra.mdra_loss(q1, q2, k1, k2, torch.randn(8, 256)).backward()
    assert all(p.grad is not None for p in online.parameters())
    assert all(p.grad is None for p in offline.parameters())

    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in offline.parameters()]
    m = 0.9
    mdra.ema_update(online, offline, m)
    for old, new, theta in zip(before, offline.parameters(), online.encoder.parameters()):
        torch.testing.assert_close(new, m * old + (1 - m) * theta)
    for b_on, b_off in zip(online.encoder.buffers(), offline.buffers()):
        assert torch.equal(b_on, b_off)  # BatchNorm statistics are copied, not averaged


def test_queue_is_fifo_and_wraps_around():
    queue = torch.zeros(6, 2)
    ptr = 0
    for i in range(4):  # 4 writes of 2 rows into 6 slots: the 4th overwrites the oldest pair
        ptr = mdra.enqueue(queue, ptr, torch.full((2, 2), float(i + 1)))
    assert ptr == 2
    assert queue[:, 0].tolist() == [4, 4, 2, 2, 3, 3]


def test_initial_queue_has_normalised_subspaces_and_is_seeded():
    q = mdra.init_queue(32, 4, seed=5)
    torch.testing.assert_close(q.view(32, 4, 64).norm(dim=-1), torch.ones(32, 4))
    assert torch.equal(q, mdra.init_queue(32, 4, seed=5))


def test_lars_adapts_and_decays_weights_but_not_biases_or_batchnorm():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    groups = mdra.lars_param_groups(net, weight_decay=0.1)
    assert [p.ndim for p in groups[0]["params"]] == [2]
    assert sorted(p.ndim for p in groups[1]["params"]) == [1, 1, 1]
    opt = mdra.LARS(groups, lr=0.5, momentum=0.9, trust_coefficient=1e-3)
    net(torch.randn(8, 5)).pow(2).sum().backward()
    w, b = net[0].weight, net[0].bias
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    opt.step()
    update = gw + 0.1 * w0
    trust = 1e-3 * w0.norm() / update.norm()
    torch.testing.assert_close(w.detach(), w0 - 0.5 * trust * update)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)  # plain SGD step: no decay, no trust ratio
    # Second step: momentum buffers carry the first update.
    opt.zero_grad()
    net(torch.randn(8, 5)).pow(2).sum().backward()
    b1, gb2 = b.detach().clone(), b.grad.clone()
    opt.step()
    torch.testing.assert_close(b.detach(), b1 - 0.5 * (0.9 * gb + gb2))


def test_lars_leaves_a_weight_whose_update_is_zero_where_it_is():
    p = torch.nn.Parameter(torch.ones(3, 3))
    opt = mdra.LARS([p], lr=1.0, weight_decay=0.0, momentum=0.9)
    p.grad = torch.zeros(3, 3)  # a zero update: the trust ratio must not divide by its norm
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3, 3))


def test_micro_step_enqueues_the_offline_keys_of_view_1_with_each_subspace_normalised():
    torch.manual_seed(0)
    online, offline = tiny_model()
    offline.train()
    v1, v2 = torch.rand(2, 8, 3, 8, 8).unbind(0)
    with torch.no_grad():  # computed by a copy, in train mode as the loop runs it: batch statistics
        expected = torch.nn.functional.normalize(copy.deepcopy(offline)(v1).view(8, 4, 64), dim=2).flatten(1)
    queue = mdra.init_queue(16, 4, seed=0)
    before = queue.clone()
    args = SimpleNamespace(groups=4, tau=0.04, mu=0.05, sinkhorn_iters=3, cross=True, accum_steps=1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    _, keys, ptr = mdra.micro_step(online, offline, queue, 8, v1, v2, args, contextlib.nullcontext(), scaler)
    assert ptr == 0 and torch.equal(queue[:8], before[:8])  # rows 8-15 were the oldest
    torch.testing.assert_close(queue[8:], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(keys, expected, atol=1e-6, rtol=0)


def test_lars_leaves_a_zero_weight_to_plain_sgd():
    p = torch.nn.Parameter(torch.zeros(3, 3))
    opt = mdra.LARS([p], lr=1.0, weight_decay=0.0, momentum=0.0)
    p.grad = torch.ones(3, 3)
    opt.step()
    torch.testing.assert_close(p.detach(), -torch.ones(3, 3))


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_zero():
    s = mdra.warmup_cosine(4.8, total_steps=100, warmup_steps=10)
    assert len(s) == 100
    assert s[0] == 0 and s[5] == pytest.approx(2.4) and s[10] == pytest.approx(4.8)
    assert s[55] == pytest.approx(2.4)  # half-way through the cosine
    assert s[99] == pytest.approx(4.8 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(s[10:], s[11:]))


def test_two_views_depend_only_on_seed_epoch_and_index():
    images, info = data.build_dataset("synthetic:16", "data", "pretrain", img_size=16)
    views = mdra.TwoViews(images, *map(mdra.view_transform, mdra.view_augmentations(info, 16)), seed=0)
    a1, a2, skipped, unread = views[(2, 5)]
    torch.manual_seed(123)  # the global RNG does not matter
    b1, b2, _, _ = views[(2, 5)]
    assert skipped == 0 and unread == "" and torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)
    assert not torch.equal(a1, views[(3, 5)][0])


IMAGENET = data.DataInfo("imagenet", 1000, [], 224, data.IMAGENET_MEAN, data.IMAGENET_STD, False)
SMALL = data.DataInfo("cifar10", 10, [], 32, (0.5,) * 3, (0.25,) * 3, True)


def test_the_views_augmentations_are_the_recipe_of_the_spec_and_differ_only_in_blur_and_solarize():
    view1, view2 = mdra.view_augmentations(IMAGENET, 224, solarize=0.2)
    assert view1.size == (224, 224) and view1.scale == (0.08, 1.0) and view1.ratio == pytest.approx((3 / 4, 4 / 3))
    assert (view1.flip_p, view1.jitter_p, view1.grey_p) == (0.5, 0.8, 0.2)
    assert [x for r in view1.jitter for x in r] == pytest.approx([0.6, 1.4, 0.6, 1.4, 0.8, 1.2, -0.1, 0.1])
    assert (view1.blur_p, view2.blur_p, view1.blur_kernel, view1.blur_sigma) == (1.0, 0.1, 23, (0.1, 2.0))
    assert (view1.solarize_p, view2.solarize_p, view2.solarize_threshold) == (0.0, 0.2, 128)
    assert view1.mean == data.IMAGENET_MEAN and view1.std == data.IMAGENET_STD
    assert dataclasses.replace(view2, blur_p=1.0, solarize_p=0.0) == view1
    small = mdra.view_augmentations(SMALL, 32)[0]
    assert small.scale == (0.2, 1.0) and small.blur_p == 0.0  # no blur at 32 px


def test_the_cpu_transforms_apply_a_views_augmentation_step_by_step_leaving_out_steps_that_never_happen():
    from torchvision import transforms as T
    view1, view2 = mdra.view_augmentations(IMAGENET, 224, solarize=0.2)
    steps = [T.RandomResizedCrop, T.RandomHorizontalFlip, T.RandomApply, T.RandomGrayscale, T.RandomApply]
    t1, t2 = (mdra.view_transform(view).transforms for view in (view1, view2))
    assert [type(t) for t in t1] == [*steps, T.ToTensor, T.Normalize]
    assert [type(t) for t in t2] == [*steps, T.RandomSolarize, T.ToTensor, T.Normalize]
    crop, flip, jitter, grey, blur, solarize = t2[:6]
    assert (crop.size, crop.scale, crop.interpolation) == ((224, 224), (0.08, 1.0), T.InterpolationMode.BICUBIC)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3)) and (flip.p, jitter.p, grey.p) == (0.5, 0.8, 0.2)
    theirs = T.ColorJitter(0.4, 0.4, 0.2, 0.1)  # the spec's jitter, exactly as torchvision makes it
    for name in ("brightness", "contrast", "saturation", "hue"):
        assert getattr(jitter.transforms[0], name) == getattr(theirs, name), name
    assert isinstance(blur.transforms[0], data.GaussianBlur) and (t1[4].p, blur.p) == (1.0, 0.1)
    assert blur.transforms[0].kernel_size == (23, 23) and blur.transforms[0].sigma == (0.1, 2.0)
    assert (solarize.threshold, solarize.p) == (128, 0.2)  # on the 0-255 scale of PIL's 8-bit images
    assert (t2[-1].mean, t2[-1].std) == (data.IMAGENET_MEAN, data.IMAGENET_STD)
    # At 32 px nothing is blurred and, without --solarize, nothing solarized: those steps, which would
    # still draw a random number each, are not there.
    assert [type(t) for t in mdra.view_transform(mdra.view_augmentations(SMALL, 32)[1]).transforms] == \
        [*steps[:4], T.ToTensor, T.Normalize]


def test_backbone_small_stem_keeps_resolution_and_width_matches():
    net, width = mdra.build_backbone("resnet18", small_stem=True)
    assert width == 512 and net.maxpool.__class__ is torch.nn.Identity
    assert net.conv1.stride == (1, 1) and net.conv1.kernel_size == (3, 3)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 512)
    assert mdra.build_backbone("resnet50", small_stem=False)[1] == 2048
    for arch in ("vit_b_16", "resnet10", "resnet50-w16", "resnet18-w0", "resnet18-wide"):
        with pytest.raises(mdra.UsageError, match="not a torchvision ResNet"):
            mdra.build_backbone(arch, small_stem=False)


@pytest.mark.parametrize("arch, layout", [("resnet10-w16", [1, 1, 1, 1]), ("resnet18-w8", [2, 2, 2, 2])])
def test_a_narrow_resnet_is_torchvisions_with_every_stage_as_much_narrower(arch, layout):
    width = int(arch.split("-w")[1])
    for small_stem in (True, False):
        net, features = mdra.build_backbone(arch, small_stem)
        assert features == 8 * width and net.conv1.out_channels == net.bn1.num_features == width
        assert net.conv1.kernel_size == ((3, 3) if small_stem else (7, 7))
        stages = [net.layer1, net.layer2, net.layer3, net.layer4]
        assert [len(stage) for stage in stages] == layout
        assert [stage[0].conv1.out_channels for stage in stages] == [width, 2 * width, 4 * width, 8 * width]
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 8 * width)
    # At torchvision's own width it is torchvision's network: the same parameters, initialised alike.
    torch.manual_seed(0)
    ours = mdra.build_backbone("resnet18-w64", small_stem=False)[0].state_dict()
    theirs = torchvision.models.resnet18()
    theirs.fc = torch.nn.Identity()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    for key in ("conv1.weight", "layer4.1.conv2.weight"):  # kaiming_normal_ (fan_out) as torchvision's convs
        assert ours[key].std().item() == pytest.approx(theirs.state_dict()[key].std().item(), rel=0.1)


@pytest.mark.parametrize("small_stem", [True, False])
def test_the_smallest_crop_is_the_one_the_network_downsamples_to_one_pixel(small_stem):
    least = mdra.min_img_size(small_stem)
    trunk = torch.nn.Sequential(*list(mdra.build_backbone("resnet18", small_stem)[0].children())[:-2]).eval()
    assert [trunk(torch.randn(1, 3, size, size)).shape[-1] for size in (least, 2 * least)] == [1, 2]


def test_effective_rank_sees_collapse():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(256, 64, generator=g)
    collapsed = torch.randn(256, 1, generator=g) * torch.ones(1, 64) + 1e-4 * spread
    assert mdra.effective_rank(spread) > 50
    assert mdra.effective_rank(collapsed) < 2