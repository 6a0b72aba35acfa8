"""The method's pieces against independent references: loss, Sinkhorn, EMA, queue, LARS, schedule."""
import copy
import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
import torchvision

import mdra
import runtime


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


@pytest.mark.parametrize("groups, iters, cross", [(1, 3, True), (4, 3, True), (8, 3, True),
                                                   (4, 0, True), (4, 3, False)])  # the method, then two ablations
def test_loss_and_its_gradients_match_a_float64_reference(groups, iters, cross):
    q1, q2, k1, k2, queue = random_inputs()
    q1.requires_grad_(), q2.requires_grad_()
    loss = mdra.mdra_loss(q1, q2, k1, k2, queue, groups=groups, tau=0.04, mu=0.05, sinkhorn_iters=iters, cross=cross)
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
    online, _, _ = mdra.build_model("resnet18", small_stem=True, predictor=False)
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    q1, q2 = online(x1, x2)
    assert torch.equal(q1, online.encoder(x1)) and torch.equal(q2, online.encoder(x2))
    assert not any(k.startswith("predictor.") for k in online.state_dict())
    default, _, _ = mdra.build_model("resnet18", small_stem=True)
    assert any(k.startswith("predictor.") for k in default.state_dict())


def test_one_pass_over_both_views_computes_what_two_passes_compute_with_batchnorm_per_view():
    torch.manual_seed(0)
    two_online, two_offline, _ = mdra.build_model("resnet18", small_stem=True)
    with torch.no_grad():  # BatchNorm scales and shifts away from 1 and 0, so that every gradient is exercised
        for module in two_online.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5), module.bias.normal_()
    two_online, two_offline = two_online.double(), two_offline.double()
    one_online = mdra.both_views_in_one_pass(copy.deepcopy(two_online))
    one_offline = mdra.both_views_in_one_pass(copy.deepcopy(two_offline))
    v1, v2 = torch.randn(2, 6, 3, 16, 16, dtype=torch.float64).unbind(0)
    v2 = 3 * v2 + 1  # views of different statistics: one BatchNorm batch of both would normalise them wrongly
    queue = torch.randn(12, 256, dtype=torch.float64)
    results = []
    for online, offline in ((two_online, two_offline), (one_online, one_offline)):
        q1, q2 = online(v1, v2)
        with torch.no_grad():
            k1, k2 = offline.both(v1, v2)
        loss = mdra.mdra_loss(q1, q2, k1, k2, queue)
        loss.backward()
        results.append((q1, q2, k1, k2, loss))
    for two, one in zip(*results):
        torch.testing.assert_close(one, two, rtol=1e-12, atol=1e-12)
    for (name, two), one in zip(two_online.named_parameters(), one_online.parameters()):
        torch.testing.assert_close(one.grad, two.grad, rtol=1e-10, atol=1e-12, msg=name)
    for two, one in ((two_online, one_online), (two_offline, one_offline)):
        two_state, one_state = two.state_dict(), one.state_dict()
        assert list(one_state) == list(two_state)
        for name in two_state:  # running_mean and running_var moved once per view, num_batches_tracked counts both
            torch.testing.assert_close(one_state[name], two_state[name], rtol=1e-12, atol=1e-12, msg=name)
    assert one_offline.state_dict()["backbone.bn1.num_batches_tracked"] == 2
    assert isinstance(one_offline.backbone.bn1, mdra.PerViewBatchNorm2d)


def test_one_pass_keeps_torchvisions_state_dict_keys_and_loads_both_ways():
    torch.manual_seed(0)
    online, offline, _ = mdra.build_model("resnet18", small_stem=True)
    plain = torchvision.models.resnet18().state_dict()
    one_offline = mdra.both_views_in_one_pass(copy.deepcopy(offline))
    assert [k for k in one_offline.state_dict() if k.startswith("backbone.")] == [
        f"backbone.{k}" for k in plain if not k.startswith("fc.")]
    one_online = mdra.both_views_in_one_pass(copy.deepcopy(online))
    online.load_state_dict(one_online.state_dict())  # strict, both ways
    one_online.load_state_dict(online.state_dict())


def test_per_view_batchnorm_normalises_each_half_alone_in_training_and_by_running_statistics_in_eval():
    torch.manual_seed(0)
    x = torch.randn(8, 5, 3, 3, dtype=torch.float64)
    x[4:] = 2 * x[4:] + 3
    for plain, per_view in ((torch.nn.BatchNorm2d(5), mdra.PerViewBatchNorm2d(5)),
                            (torch.nn.SyncBatchNorm(5), mdra.PerViewSyncBatchNorm(5))):  # no process group: local
        plain, per_view = plain.double(), per_view.double()
        torch.testing.assert_close(per_view(x), torch.cat([plain(x[:4]), plain(x[4:])]))
        torch.testing.assert_close(per_view.running_var, plain.running_var)
        assert per_view.num_batches_tracked == plain.num_batches_tracked == 2
        plain.eval(), per_view.eval()
        torch.testing.assert_close(per_view(x[:3]), plain(x[:3]))  # eval: any batch size, odd included


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
        "q1, q2 = (x[k][rows].clone().requires_grad_() for k in ('q1', 'q2'))\n"
        "loss = mdra.mdra_loss(q1, q2, x['k1'][rows], x['k2'][rows], x['queue'])\n"
        "loss.backward()\n"
        "R = mdra.sinkhorn(x['k1'][rows] @ x['queue'].T / 100, 0.05, 3)\n"
        "torch.save({'loss': loss.detach(), 'g1': q1.grad, 'g2': q2.grad, 'R': R}, f'{sys.argv[2]}/rank{r}.pt')\n"
        "dist.destroy_process_group()\n")
    gloo_ranks([worker, tmp_path / "inputs.pt", tmp_path], 2).wait()
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    q1.requires_grad_(), q2.requires_grad_()
    loss = mdra.mdra_loss(q1, q2, k1, k2, queue)
    loss.backward()
    # The global loss is the mean of the rank-local means; DDP averages gradients over ranks, so a
    # rank's row gradient divided by the world size equals the single-process row gradient.
    assert ((parts[0]["loss"] + parts[1]["loss"]) / 2).item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(torch.cat([p["g1"] for p in parts]) / 2, q1.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(torch.cat([p["g2"] for p in parts]) / 2, q2.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(torch.cat([p["R"] for p in parts]), mdra.sinkhorn(k1 @ queue.T / 100, 0.05, 3))


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
    online, offline, width = mdra.build_model("resnet18", small_stem=True)
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
    import contextlib
    import copy
    from types import SimpleNamespace
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
    # --offline-view weak: the offline encoder sees views of its own, and the queue takes those of the first.
    w1, w2 = torch.rand(2, 8, 3, 8, 8).unbind(0)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(copy.deepcopy(offline)(w1).view(8, 4, 64), dim=2).flatten(1)
    _, keys, ptr = mdra.micro_step(online, offline, queue, ptr, v1, v2, args, contextlib.nullcontext(), scaler,
                                   offline_views=(w1, w2))
    assert ptr == 8
    torch.testing.assert_close(queue[:8], expected, atol=1e-6, rtol=0)


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


def test_epoch_sampler_splits_each_global_batch_into_contiguous_rank_slices():
    one = mdra.EpochSampler(20, global_batch=8, num_batches=2, world_size=1, rank=0, seed=3)
    two = [mdra.EpochSampler(20, global_batch=8, num_batches=2, world_size=2, rank=r, seed=3) for r in range(2)]
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


def test_two_views_depend_only_on_seed_epoch_and_index():
    images, info = mdra.build_dataset("synthetic", "data", "pretrain", synthetic_size=16, img_size=16)
    v1, v2 = mdra.pretrain_transforms(info, 16)
    views = mdra.TwoViews(images, v1, v2, seed=0)
    a1, a2, skipped, unread = views[(2, 5)]
    torch.manual_seed(123)  # the global RNG does not matter
    b1, b2, _, _ = views[(2, 5)]
    assert skipped == 0 and unread == "" and torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)
    assert not torch.equal(a1, views[(3, 5)][0])


def test_weak_offline_views_are_cropped_and_flipped_but_not_recoloured_and_leave_the_two_views_alone():
    # --offline-view weak, ReSSL's weaker teacher view: a one-colour image keeps its colour in every weak view
    # (no jitter, greyscale, blur or solarize) where the two views recolour it in most samples; a two-tone
    # image shows that the weak views are still cropped and flipped at random.
    from PIL import Image
    v1, v2 = mdra.pretrain_transforms(SMALL, 16, solarize=0.5)
    weak = mdra.view_transform(mdra.weak_view(mdra.view_augmentations(SMALL, 16, solarize=0.5)[1]))
    colour = torch.tensor([200, 40, 90]) / 255
    plain = [(Image.new("RGB", (24, 24), (200, 40, 90)), 0)]
    expected = ((colour - torch.tensor(SMALL.mean)) / torch.tensor(SMALL.std))[:, None, None].expand(3, 16, 16)
    samples = [mdra.TwoViews(plain, v1, v2, 0, (weak, weak))[(epoch, 0)] for epoch in range(30)]
    for sample in samples:
        assert len(sample) == 6 and sample[4:] == (0, "")
        for w in sample[2:4]:
            torch.testing.assert_close(w, expected, atol=1e-6, rtol=0)
    assert sum(not torch.allclose(s[0], expected, atol=1e-3) for s in samples) >= 15  # jitter p 0.8, grey p 0.2
    for epoch, sample in enumerate(samples):  # drawn after the two views, which are as without them
        alone = mdra.TwoViews(plain, v1, v2, 0)[(epoch, 0)]
        assert torch.equal(alone[0], sample[0]) and torch.equal(alone[1], sample[1]) and alone[2:] == sample[4:]
    halves = Image.new("RGB", (24, 24))
    halves.paste((255, 255, 255), (0, 0, 12, 24))  # white on the left
    two_tone = mdra.TwoViews([(halves, 0)], v1, v2, 0, (weak, weak))
    weak_views = [two_tone[(epoch, 0)][2] for epoch in range(20)]
    assert len({tuple(w[0].mean(0).tolist()) for w in weak_views}) >= 10  # crops of one half alone are alike
    assert any(w[0, :, 0].mean() < w[0, :, -1].mean() for w in weak_views)  # white moved right: flipped
    assert any(w[0, :, 0].mean() > w[0, :, -1].mean() for w in weak_views)


IMAGENET = mdra.DataInfo("imagenet", 1000, [], 224, mdra.IMAGENET_MEAN, mdra.IMAGENET_STD, False)
SMALL = mdra.DataInfo("cifar10", 10, [], 32, (0.5,) * 3, (0.25,) * 3, True)


def test_the_views_augmentations_are_the_recipe_of_the_spec_and_differ_only_in_blur_and_solarize():
    view1, view2 = mdra.view_augmentations(IMAGENET, 224, solarize=0.2)
    assert view1.size == (224, 224) and view1.scale == (0.08, 1.0) and view1.ratio == pytest.approx((3 / 4, 4 / 3))
    assert (view1.flip_p, view1.jitter_p, view1.grey_p) == (0.5, 0.8, 0.2)
    assert [x for r in view1.jitter for x in r] == pytest.approx([0.6, 1.4, 0.6, 1.4, 0.8, 1.2, -0.1, 0.1])
    assert (view1.blur_p, view2.blur_p, view1.blur_kernel, view1.blur_sigma) == (1.0, 0.1, 23, (0.1, 2.0))
    assert (view1.solarize_p, view2.solarize_p, view2.solarize_threshold) == (0.0, 0.2, 128)
    assert view1.mean == mdra.IMAGENET_MEAN and view1.std == mdra.IMAGENET_STD
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
    assert isinstance(blur.transforms[0], mdra.GaussianBlur) and (t1[4].p, blur.p) == (1.0, 0.1)
    assert blur.transforms[0].kernel_size == (23, 23) and blur.transforms[0].sigma == (0.1, 2.0)
    assert (solarize.threshold, solarize.p) == (128, 0.2)  # on the 0-255 scale of PIL's 8-bit images
    assert (t2[-1].mean, t2[-1].std) == (mdra.IMAGENET_MEAN, mdra.IMAGENET_STD)
    # At 32 px nothing is blurred and, without --solarize, nothing solarized: those steps, which would
    # still draw a random number each, are not there.
    assert [type(t) for t in mdra.view_transform(mdra.view_augmentations(SMALL, 32)[1]).transforms] == \
        [*steps[:4], T.ToTensor, T.Normalize]


def test_a_data_set_is_one_entry_of_the_table(monkeypatch):
    import numpy as np

    def load(data_dir, split, **_):
        return mdra.ArrayImages(np.zeros((6, 5, 7), np.uint8), [0, 1, 2] * 2, ["ant", "bee", "cow"])

    monkeypatch.setitem(mdra.DATA_SETS, "tiny", mdra.NamedData(load, 7, (0.1,) * 3, (0.2,) * 3, downloads=False))
    images, info = mdra.build_dataset("tiny", "data", "train")
    assert info == mdra.DataInfo("tiny", 3, ["ant", "bee", "cow"], 7, (0.1,) * 3, (0.2,) * 3, True)
    image, label = images[4]
    assert image.size == (7, 5) and image.mode == "RGB" and label == 1 and images.names[4] == "4"
    images, info = mdra.build_dataset("synthetic", "data", "val", synthetic_size=64, img_size=12)
    assert info == mdra.DataInfo("synthetic", 10, [f"class{i}" for i in range(10)], 12, (0.5,) * 3, (0.25,) * 3, True)
    assert len(images) == len(images.targets) == len(set(images.names)) == 16
    assert mdra.SMALL_DATASETS == ("fashion-mnist", "cifar10", "cifar100", "stl10", "synthetic")


def test_sample_rng_draws_what_torch_manual_seed_draws_and_restores_the_global_state():
    torch.manual_seed(7)
    expected = (torch.rand(3), torch.randint(0, 1000, (3,)), torch.randperm(4))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with runtime.sample_rng(7):
        drawn = (torch.rand(3), torch.randint(0, 1000, (3,)), torch.randperm(4))
    assert all(torch.equal(a, b) for a, b in zip(drawn, expected))  # the views of earlier versions
    assert torch.equal(torch.get_rng_state(), before)


def test_an_unreadable_image_is_skipped_and_named_by_the_path_to_open_with_why(tmp_path, monkeypatch):
    from PIL import Image
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (20, 20), color=(10, 200, 30)).save(tmp_path / cls / "good.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"not an image at all")
    Image.new("RGB", (30, 30)).save(tmp_path / "a" / "big.png")  # 900 pixels, over the limit set below
    images, info = mdra.build_dataset(str(tmp_path), "data", "pretrain")
    assert info.num_classes == 2 and not info.small
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # PIL refuses more than twice this
    big = images.paths.index(str(tmp_path / "a" / "big.png"))  # sorted: big, broken, good
    image, label, skipped = runtime.read_image(images, big)
    assert image.size == (20, 20) and skipped == [
        f"{tmp_path}/a/big.png: over PIL's pixel limit of 800 pixels",
        f"{tmp_path}/a/broken.png: corrupt or not an image (of no format PIL knows)"]
    views = mdra.TwoViews(images, *mdra.pretrain_transforms(info, 16), seed=0)
    assert views[(0, big)][2:] == (2, "\n".join(skipped))  # what a loader worker hands on


def test_val_images_are_labelled_by_the_training_classes_even_where_val_lacks_one(tmp_path):
    from PIL import Image
    for split, classes in (("train", "cat dog eel"), ("val", "cat eel")):
        for cls in classes.split():
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / cls / "0.png")
    train, info = mdra.build_dataset(str(tmp_path), "data", "train")
    val, val_info = mdra.build_dataset(str(tmp_path), "data", "val")
    assert train.targets == [0, 1, 2] and val.targets == [0, 2]  # eel is 2 in both, not 1 in val
    assert val_info.num_classes == info.num_classes == 3 and val.classes == train.classes
    (tmp_path / "val" / "dog").mkdir()  # empty: as if it were not there
    assert mdra.build_dataset(str(tmp_path), "data", "val")[0].targets == [0, 2]
    (tmp_path / "empty" / "val" / "cat").mkdir(parents=True)
    (tmp_path / "train").rename(tmp_path / "empty" / "train")
    with pytest.raises(runtime.UsageError, match=r"val is not an ImageFolder .*\(found no image in any class folder\)"):
        mdra.build_dataset(str(tmp_path / "empty"), "data", "val")
    (tmp_path / "empty" / "train").rename(tmp_path / "train")
    (tmp_path / "val" / "fox").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "fox" / "0.png")
    with pytest.raises(runtime.UsageError, match="val has 1 classes that the training images lack, e.g. fox"):
        mdra.build_dataset(str(tmp_path), "data", "val")
    (tmp_path / "train").rename(tmp_path / "elsewhere")  # classes and val/ side by side: val/ is not a class
    with pytest.raises(runtime.UsageError, match="has a val/ folder but no train/ folder"):
        mdra.build_dataset(str(tmp_path), "data", "pretrain")


def test_a_truncated_or_foreign_idx_file_is_one_sentence(tmp_path):
    import gzip
    import numpy as np
    header = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (4).to_bytes(4, "big")
    whole = tmp_path / "whole-idx3-ubyte"
    whole.write_bytes(header + bytes(range(24)))
    assert np.array_equal(mdra.read_idx(whole), np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    short = tmp_path / "short-idx3-ubyte"
    short.write_bytes(header + bytes(20))
    foreign = tmp_path / "foreign-idx3-ubyte"
    foreign.write_bytes(b"\x89PNG\r\n" + bytes(30))
    truncated = tmp_path / "truncated-idx3-ubyte.gz"
    truncated.write_bytes(gzip.compress(header + bytes(24))[:-12])
    for path, message in ((short, "is not a whole IDX file"), (foreign, "is not a whole IDX file"),
                          (truncated, "cannot be read (EOFError")):
        with pytest.raises(runtime.UsageError, match=re.escape(message)):
            mdra.read_idx(path)
    # Each file whole, the pair not: fewer labels than images, labels as images, a label past the last class.
    def labels_file(name, values):
        path = tmp_path / f"{name}-idx1-ubyte"
        path.write_bytes(bytes([0, 0, 8, 1]) + len(values).to_bytes(4, "big") + bytes(values))
        return path

    assert [a.tolist() for a in mdra.idx_pair(whole, labels_file("good", [9, 0]), 10)] == \
        [np.arange(24).reshape(2, 3, 4).tolist(), [9, 0]]
    for images, labels, shapes in ((whole, labels_file("one", [1]), "[2, 3, 4] and [1]"),
                                   (whole, whole, "[2, 3, 4] and [2, 3, 4]"),
                                   (whole, labels_file("past", [3, 10]), "[2, 3, 4] and [2]")):
        with pytest.raises(runtime.UsageError, match=re.escape(f"are not a pair of images [n, H, W] and labels [n] "
                                                               f"below 10 (their shapes: {shapes}).")):
            mdra.idx_pair(images, labels, 10)


def test_fashion_mnist_is_read_from_the_system_idx_files(tmp_path):
    if not Path(mdra.FASHION_MNIST_SYSTEM_DIR).is_dir():
        pytest.skip("the dataset-fashion-mnist package is not installed")
    images, info = mdra.build_dataset("fashion-mnist", str(tmp_path), "val")
    assert len(images) == 10000 and info.num_classes == 10 and info.native_size == 28
    image, label = images[0]
    assert image.size == (28, 28) and image.mode == "RGB" and label == 9  # the first test image is an ankle boot
    assert info.class_names[9] == "Ankle boot"


def test_backbone_small_stem_keeps_resolution_and_width_matches():
    net, width = mdra.build_backbone("resnet18", small_stem=True)
    assert width == 512 and net.maxpool.__class__ is torch.nn.Identity
    assert net.conv1.stride == (1, 1) and net.conv1.kernel_size == (3, 3)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 512)
    assert mdra.build_backbone("resnet50", small_stem=False)[1] == 2048
    with pytest.raises(runtime.UsageError, match="not a torchvision ResNet"):
        mdra.build_backbone("vit_b_16", small_stem=False)


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


def gaussian_blur_reference(image, kernel_size, sigma):
    """torchvision's definition computed another way: one 2-d convolution in float64 with the outer
    product of the normalised 1-d kernels, after reflect padding."""
    def kernel1d(k):
        offsets = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, dtype=torch.float64)
        weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
        return weights / weights.sum()

    kx, ky = kernel_size
    x = torch.nn.functional.pad(image.double()[None], [kx // 2, kx // 2, ky // 2, ky // 2], mode="reflect")
    kernel = torch.outer(kernel1d(ky), kernel1d(kx))[None, None].expand(image.shape[0], 1, ky, kx)
    return torch.nn.functional.conv2d(x, kernel, groups=image.shape[0])[0]


@pytest.mark.parametrize("shape,kernel_size", [((3, 224, 224), (23, 23)), ((1, 40, 57), (5, 9))])
def test_gaussian_blur_is_torchvisions_one_axis_at_a_time(shape, kernel_size):
    from PIL import Image
    from torchvision import transforms as T
    from torchvision.transforms import functional as TF

    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    for sigma in (0.1, 0.9, 2.0):
        blurred = mdra.separable_gaussian_blur(image.float(), kernel_size, sigma)
        torch.testing.assert_close(blurred.double(), gaussian_blur_reference(image, kernel_size, sigma),
                                   atol=1e-3, rtol=0)
    # As a transform on PIL images: the same random sigma as torchvision's, pixels within rounding.
    pil = TF.to_pil_image(image[0] if shape[0] == 1 else image)
    ours, theirs = mdra.GaussianBlur(kernel_size, (0.1, 2.0)), T.GaussianBlur(kernel_size, (0.1, 2.0))
    for seed in range(5):
        torch.manual_seed(seed)
        a = TF.pil_to_tensor(ours(pil)).int()
        after_ours = torch.rand(1)
        torch.manual_seed(seed)
        b = TF.pil_to_tensor(theirs(pil)).int()
        assert torch.equal(torch.rand(1), after_ours)  # the same draws from the global generator
        assert isinstance(ours(pil), Image.Image) and ours(pil).mode == pil.mode
        assert (a - b).abs().max() <= 1 and (a != b).float().mean() < 1e-3


def test_16_bit_grey_images_are_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    import numpy as np
    from PIL import Image
    (tmp_path / "scans").mkdir()
    grey16 = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "scans" / "16-bit.png")
    Image.fromarray((grey16 // 257).astype(np.uint8)).save(tmp_path / "scans" / "8-bit.png")
    images = mdra.ImageFiles(tmp_path)
    sixteen, eight = (np.asarray(images[images.names.index(f"scans/{name}.png")][0]) for name in ("16-bit", "8-bit"))
    assert sixteen.tolist() == eight.tolist() == [[[0] * 3, [64] * 3, [128] * 3, [255] * 3]]
