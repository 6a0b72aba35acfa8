"""MDRA: Multi-Dimensional Relation Alignment, self-supervised pretraining (MDRA_SPEC.md).

Two augmented views of each image go through an online encoder (backbone f, projector g, predictor h),
trained by back-propagation, and an offline encoder (f', g'), its moving average. Against a queue of
past offline embeddings, the online encoder's relations (softmax similarities) of one view are pulled
towards the offline encoder's Sinkhorn-balanced relations of the other view, in G subspaces. Read top to
bottom: the method, the networks, the optimizer, the augmentation, the data, the loop, the command line.
Processes, signals, checkpoints and logging are runtime.py's, the data sets data.py's, the kNN knn.py's.

    python mdra.py --data fashion-mnist --arch resnet18 --epochs 1          # one process, CPU or GPU
    torchrun --nproc_per_node=8 mdra.py --data /path/to/imagenet            # the patent's recipe
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 \\
        --nproc_per_node=8 mdra.py --data /path/to/imagenet                 # node 0 of 2 (node 1: --node_rank=1)
    (the same command again, with the same --out-dir, resumes from <out-dir>/checkpoint.pth)
"""
import argparse
import contextlib
import copy
import datetime
import shlex
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Dataset
from torchvision import transforms as T

import data
import knn
import runtime
from runtime import UsageError

EMBED_DIM = 256  # D, the output of projector and predictor


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
# Networks, the moving average and the queue (spec sections 2 and 5)
# ------------------------------------------------------------------------------------------------

# ResNets of basic blocks that --arch also takes with a width: NAME-wW has stages of W, 2W, 4W and 8W
# channels (torchvision's are 64 wide): small networks for a CPU, e.g. resnet10-w16.
BASIC_BLOCK_LAYOUTS = {"resnet10": [1, 1, 1, 1], "resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}


RESNETS = sorted(n for n in torchvision.models.list_models(module=torchvision.models) if "resnet" in n or "resnext" in n)


class NarrowResNet(torchvision.models.ResNet):
    """torchvision's ResNet of basic blocks with `width` channels after the stem instead of 64, and
    every stage as much narrower."""

    def __init__(self, layers, width):
        self.width = width
        super().__init__(torchvision.models.resnet.BasicBlock, layers)
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # as ResNet's other convs
        self.fc = nn.Linear(8 * width, self.fc.out_features)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == 64:  # the first stage, after the stem
            self.inplanes = self.width
        return super()._make_layer(block, planes * self.width // 64, blocks, stride, dilate)


def build_backbone(arch, small_stem):
    """A torchvision ResNet (or a NarrowResNet) without its fc; returns (module, feature width)."""
    name, _, width = arch.partition("-w")
    if arch in RESNETS:
        net = torchvision.models.get_model(arch, weights=None)
    elif name in BASIC_BLOCK_LAYOUTS and width.isdigit() and 1 <= int(width) <= 1024:
        net = NarrowResNet(BASIC_BLOCK_LAYOUTS[name], int(width))
    else:
        raise UsageError(f"--arch {arch} is not a torchvision ResNet ({', '.join(RESNETS)}) nor one of "
                         f"{', '.join(BASIC_BLOCK_LAYOUTS)} with a width, e.g. resnet10-w16.")
    if small_stem:  # 3x3 stride-1 first conv and no max-pool keep small images from shrinking to 1 px
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    width = net.fc.in_features
    net.fc = nn.Identity()
    return net, width


def min_img_size(small_stem):
    """The smallest crop whose last stage still sees a pixel of its own, not padding: layer2, layer3 and
    layer4 each halve the resolution (8x, all the small stem does); the ImageNet stem adds 4x (32x)."""
    return 8 if small_stem else 32


def mlp(in_dim, hidden_dim, out_dim=EMBED_DIM):
    """Projector g and predictor h: Linear -> BatchNorm1d -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class Encoder(nn.Module):
    """Backbone f and projector g; the offline encoder is a moving-average copy of this."""

    def __init__(self, backbone, width, hidden_dim):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(width, hidden_dim)

    def forward(self, x):
        return self.projector(self.backbone(x))


class Online(nn.Module):
    """The online branch: q = h(g(f(v))) of both views, each view its own batch for BatchNorm, in one
    call (one DDP forward). Without a predictor (an ablation) h is the identity, and q = g(f(v))."""

    def __init__(self, encoder, hidden_dim, predictor=True):
        super().__init__()
        self.encoder = encoder
        self.predictor = mlp(EMBED_DIM, hidden_dim) if predictor else nn.Identity()

    def forward(self, v1, v2):
        return self.predictor(self.encoder(v1)), self.predictor(self.encoder(v2))


def build_model(arch, small_stem, predictor=True, hidden_dim=4096):
    """Returns (online, offline, feature width). The offline encoder starts as a copy, never gets
    gradients, and runs in train mode (batch statistics), as in BYOL."""
    backbone, width = build_backbone(arch, small_stem)
    online = Online(Encoder(backbone, width, hidden_dim), hidden_dim, predictor)
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
# LARS and the schedule (spec section 6)
# ------------------------------------------------------------------------------------------------

class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al., 2017).

    Parameter groups with lars_exclude=True (biases and BatchNorm) get neither weight decay nor the
    trust ratio. The update of a group is a few multi-tensor (foreach) kernels, not a few per
    parameter, and torch.where keeps the ratios on the device: no host sync.
    """

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=1e-3):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
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
# The view augmentation (spec section 6)
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ViewAugmentation:
    """One view's augmentation, in the order it is applied; ranges are (low, high). The loader applies it
    to PIL images as torchvision transforms (view_transform); gpu_aug.py to batches of tensors."""
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


def view_transform(view):
    """A ViewAugmentation as torchvision transforms of a PIL image. A step that never happens
    (probability 0) is left out: it would still draw a random number."""
    crop = T.RandomResizedCrop(view.size, scale=view.scale, ratio=view.ratio,
                               interpolation=T.InterpolationMode.BICUBIC)
    jitter = T.ColorJitter(*(0 if factors is None else factors for factors in view.jitter))
    steps = [(view.flip_p, T.RandomHorizontalFlip(view.flip_p)),
             (view.jitter_p, T.RandomApply([jitter], p=view.jitter_p)),
             (view.grey_p, T.RandomGrayscale(view.grey_p)),
             (view.blur_p, T.RandomApply([data.GaussianBlur(view.blur_kernel, sigma=view.blur_sigma)], p=view.blur_p)),
             (view.solarize_p, T.RandomSolarize(view.solarize_threshold, p=view.solarize_p))]
    return T.Compose([crop, *(step for p, step in steps if p > 0), T.ToTensor(), T.Normalize(view.mean, view.std)])


# ------------------------------------------------------------------------------------------------
# The data pretraining needs: two views per image, in an order that any number of ranks shares
# ------------------------------------------------------------------------------------------------

class TwoViews(Dataset):
    """Pretraining samples (v1, v2, the number of unreadable files passed over, their "path: why" lines),
    keyed by (epoch, index), which seeds the views: not workers, ranks, or whether the run was resumed."""

    def __init__(self, images, view1, view2, seed):
        self.images, self.view1, self.view2, self.seed = images, view1, view2, seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        epoch, index = key
        image, _, skipped = data.read_image(self.images, index)
        with data.sample_rng(data.sample_seed(self.seed, epoch, index)):
            v1, v2 = self.view1(image), self.view2(image)
        return v1, v2, len(skipped), "\n".join(skipped)


def pretrain_loader(images, info, args, env, num_batches):
    """This rank's pretraining micro-batches, (v1, v2, skipped, unread) each, and their sampler. With
    --gpu-aug an in-memory data set is held on the device and the views are made there (gpu_aug.py)."""
    sampler = data.EpochSampler(len(images), args.batch_size, num_batches, env.world_size, env.rank, args.seed)
    views = view_augmentations(info, args.img_size, args.solarize)
    if args.gpu_aug:
        import gpu_aug  # the device path, outside the reading path
        return gpu_aug.DeviceViews(images, views, sampler, args.seed, env), sampler
    dataset = TwoViews(images, *map(view_transform, views), args.seed)
    return runtime.data_loader(dataset, args.batch_size // env.world_size, args.workers, env.device,
                               sampler=sampler), sampler


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

# What a resumed run may change besides runtime.RUN_FLAGS; the method, data, schedule and seed are the run's.
RESUME_MAY_CHANGE = runtime.RUN_FLAGS + ("keep_every", "knn_every", "knn_subset")
RETIRED_SETTINGS = {"offline_view": "same"}  # of earlier versions: another value than these trained another way


def micro_step(online, offline, queue, queue_ptr, v1, v2, args, autocast, scaler, sync_grads=True, loss_fn=None):
    """One micro-batch: both branches, the loss (mdra_loss, or loss_fn: it compiled), its backward (scaled for
    accumulation), then the queue update. Returns (the detached loss, the enqueued keys, the new queue pointer)."""
    # DDP all-reduces gradients only when sync_grads: on the last micro-batch of an optimizer step.
    with contextlib.nullcontext() if sync_grads or not isinstance(online, DDP) else online.no_sync():
        with autocast:
            q1, q2 = online(v1, v2)
            with torch.no_grad():
                k1, k2 = offline(v1), offline(v2)
        loss = (loss_fn or mdra_loss)(q1, q2, k1, k2, queue, args.groups, args.tau, args.mu, args.sinkhorn_iters,
                                      cross=args.cross)
        scaler.scale(loss / args.accum_steps).backward()
    # The queue moves once per micro-batch, after the loss that used it.
    keys = runtime.all_gather_rows(normalize_subspaces(k1.to(queue.dtype), args.groups).flatten(1))
    return loss.detach(), keys, enqueue(queue, queue_ptr, keys)


def train(args):
    env = runtime.setup_distributed(args.device)
    out_dir = runtime.take_out_dir(args.out_dir, env, data.image_folder_root(args.data), copies=("mdra",))
    images, info = data.build_dataset(args.data, args.data_dir, "pretrain", args.img_size or 32)
    args = resolve_args(args, info, env)
    if args.knn_every:  # the monitor needs labelled train and val images: fail now, not after an epoch
        knn.require_monitor_data(args)
    log, device = runtime.Logger(out_dir, env.is_main), env.device
    batch_images = args.batch_size * args.accum_steps  # per optimizer step
    steps_per_epoch = len(images) // batch_images
    if steps_per_epoch == 0:
        raise UsageError(f"the data set has {len(images)} images, fewer than one optimizer step "
                         f"({args.batch_size} x {args.accum_steps}).")
    total_steps = args.epochs * steps_per_epoch
    last_step = min(total_steps, args.max_steps or total_steps)

    online, offline, width, queue, memory_format = networks(args, env)
    lr_schedule = warmup_cosine(args.lr * batch_images / 256, total_steps, int(args.warmup_epochs * steps_per_epoch))
    optimizer = LARS(lars_param_groups(online, args.weight_decay), momentum=0.9)
    autocast = runtime.autocast(device, args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    # ---- resume, then the per-rank randomness, a function of the step (no generator state to restore)
    ckpt_path, fingerprint = out_dir / "checkpoint.pth", runtime.data_fingerprint(images.names)
    batchnorm_batch = args.batch_size // (1 if runtime.sync_bn(env) else env.world_size)
    ckpt = runtime.restart_from_checkpoint(ckpt_path, args, get_parser(), RESUME_MAY_CHANGE, fingerprint,
                                           batchnorm_batch, {"online": (online, "the online network"),
                                            "offline": (offline, "the offline network")}, optimizer,
                                           scaler, env, log, needs=("queue", "queue_ptr"), retired=RETIRED_SETTINGS)
    step, queue_ptr = (ckpt["step"], restore_queue(ckpt, ckpt_path, queue, args)) if ckpt else (0, 0)
    progress = runtime.Progress(device, step, ckpt)
    torch.manual_seed(args.seed + env.rank + step)
    trained, loss_fn = compiled(online, offline, args, env)

    def save(keep_epoch=None):  # rank 0 writes; never weights that a non-finite loss has touched
        progress.check_finite(progress.last_saved, step, ckpt_path, "mdra.py")
        progress.last_saved, epoch_loss = step, progress.epoch_state(env)
        keep = ckpt_path.with_name(f"checkpoint_epoch{keep_epoch:04d}.pth") if keep_epoch else None
        runtime.save_on_main(env, lambda: runtime.checkpoint_state(
            "mdra", args, step, steps_per_epoch, width, online.encoder.backbone, optimizer, scaler, info,
            fingerprint, batchnorm_batch, online=online.state_dict(), offline=offline.state_dict(),
            queue=queue.cpu(), queue_ptr=queue_ptr, epoch_loss=epoch_loss, rng=runtime.rng_states(device)),
            ckpt_path, keep)

    data.read_image(images, 0)  # here, not in a loader worker: a data set with no readable image is one sentence
    loader, sampler = pretrain_loader(images, info, args, env, steps_per_epoch * args.accum_steps)
    runtime.announce(log, "mdra.py", env, args, step=step)
    log.print(f"{len(images)} images, {steps_per_epoch} optimizer steps per epoch of {batch_images} images, "
              f"lr {args.lr * batch_images / 256:.4g} after {args.warmup_epochs:g} warm-up epochs")
    skips, keys, backbone = data.SkippedImages(log), None, online.encoder.backbone
    runtime.defer_stop_signals()
    if args.knn_every and step == 0:  # the same network untrained: what the closing lines compare the end with
        log.json({"event": "knn", "epoch": 0, "step": 0, "knn": monitor(backbone, args, env, log, progress, "untrained")})
    for epoch in range(step // steps_per_epoch, args.epochs):
        if step >= last_step:
            break
        sampler.set_epoch(epoch, start_batch=(step % steps_per_epoch) * args.accum_steps)
        progress.start_epoch(step, epoch * steps_per_epoch)
        for micro, (v1, v2, skipped, unread) in enumerate(runtime.timed(loader, progress), 1):
            skips.add(skipped, unread)
            v1, v2 = (v.to(device, non_blocking=True, memory_format=memory_format) for v in (v1, v2))
            last_micro = micro % args.accum_steps == 0
            loss, keys, queue_ptr = micro_step(trained, offline, queue, queue_ptr, v1, v2, args, autocast, scaler,
                                               sync_grads=last_micro, loss_fn=loss_fn)
            progress.add(loss / args.accum_steps)
            if not last_micro:
                continue
            for group in optimizer.param_groups:
                group["lr"] = float(lr_schedule[step])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            ema_update(online, offline, args.momentum)  # once per optimizer step, after it
            step += 1
            if step % args.log_every == 0 or step == last_step:
                log_step(log, progress, step, epoch, args, env, lr_schedule, keys, last_step, total_steps, skips,
                         ckpt_path)
            end_of_epoch = step % steps_per_epoch == 0
            if not end_of_epoch:  # at an epoch's end, after the epoch is saved and monitored
                runtime.exit_if_stop_requested(env.control, save, log, step, ckpt_path)
            if step % args.save_every == 0:
                save()
            if step >= last_step or end_of_epoch:
                break
        if step % steps_per_epoch:  # --max-steps ended the run inside this epoch
            break
        end_epoch(epoch, step, args, env, log, progress, save, backbone, skips, ckpt_path)

    if progress.last_saved != step:
        save()
    if args.knn_every and step % steps_per_epoch:  # --max-steps ended the run inside an epoch: its end too
        log.json({"event": "knn", "epoch": step / steps_per_epoch, "step": step,
                  "knn": monitor(backbone, args, env, log, progress, f"step {step}")})
    log.print(f"done: {step} optimizer steps; checkpoint: {ckpt_path.resolve()}")
    if env.is_main:  # from log.jsonl, so that the steps before a resume count too
        log.print("\n".join(closing_lines(runtime.logged_records(log.path), min(EMBED_DIM, args.batch_size),
                                        ckpt_path, device, args.knn_subset)))
    return ckpt_path


def restore_queue(ckpt, ckpt_path, queue, args):
    """The queue of a resumed run, put back; returns its pointer."""
    if ckpt["queue"].shape != queue.shape:  # copy_ would broadcast a single row over the whole queue
        raise UsageError(f"{ckpt_path}: queue is shaped {list(ckpt['queue'].shape)}, not {list(queue.shape)} as this "
                         "run's.")
    if ckpt["queue_ptr"] % args.batch_size:  # enqueue writes whole batches, which never wrap
        raise UsageError(f"{ckpt_path}: queue_ptr is {ckpt['queue_ptr']}, not a multiple of the batch of "
                         f"{args.batch_size} keys that enqueue writes.")
    queue.copy_(ckpt["queue"])
    return int(ckpt["queue_ptr"])


def networks(args, env):
    """The online and offline networks and the queue on the device, the same on every rank; and the networks'
    memory format."""
    torch.manual_seed(args.seed)
    online, offline, width = build_model(args.arch, args.small_stem, args.predictor, args.hidden_dim)
    if runtime.sync_bn(env):  # BatchNorm over the global micro-batch of each view (spec section 2)
        online, offline = map(nn.SyncBatchNorm.convert_sync_batchnorm, (online, offline))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    online, offline = (net.to(env.device, memory_format=memory_format) for net in (online, offline))
    return online, offline, width, init_queue(args.queue_size, args.groups, args.seed).to(env.device), memory_format


def compiled(online, offline, args, env):
    """What the loop calls: the networks and the loss, compiled as --compile says (the networks in place, so
    that state-dict keys stay plain); the online network DDP-wrapped with several ranks, each keeping its
    BatchNorm statistics. Under DDP the compiled loss keeps Sinkhorn's all-reduces inside its one graph."""
    if args.compile in ("networks", "all"):
        for net in (online.encoder, online.predictor, offline):
            net.compile(backend=args.compile_backend)
    loss_fn = torch.compile(mdra_loss, backend=args.compile_backend) if args.compile in ("loss", "all") else None
    offline.train()
    return runtime.ddp(online, env, buffers=False) if env.world_size > 1 else online, loss_fn


def end_epoch(epoch, step, args, env, log, progress, save, backbone, skips, ckpt_path):
    """After an epoch: save (a copy every --keep-every epochs), then the kNN monitor every --knn-every,
    then the epoch's record; a stop signal during the epoch's last step or the monitor stops here."""
    record = {"event": "epoch", "epoch": epoch + 1, "step": step, "loss": progress.epoch_mean(step, env),
              "time_s": time.perf_counter() - progress.epoch_tic, "skipped_images": skips.total}
    keep = args.keep_every > 0 and (epoch + 1) % args.keep_every == 0
    if keep or progress.last_saved != step:  # before the kNN monitor, which a time limit may cut short
        save(keep_epoch=epoch + 1 if keep else None)
    if args.knn_every and (epoch + 1) % args.knn_every == 0:
        record["knn"] = monitor(backbone, args, env, log, progress, f"epoch {epoch + 1}")
    log.json(record)
    runtime.exit_if_stop_requested(env.control, save, log, step, ckpt_path)


def log_step(log, progress, step, epoch, args, env, lr_schedule, keys, last_step, total_steps, skips, ckpt_path):
    """The log line and record of the steps since the last one (a host sync: only every --log-every)."""
    window = progress.window(step, args.batch_size * args.accum_steps, last_step, env, ckpt_path, "mdra.py")
    record = {"epoch": epoch + 1, "step": step, "loss": window["loss"], "lr": float(lr_schedule[step - 1]),
              "ema_momentum": args.momentum, "pairs_per_s": window["rate"], "data_wait": window["data_wait"],
              "rankme": effective_rank(keys).item(), "eta_s": window["eta_s"], "peak_mem_gb": window["peak_mem_gb"],
              "skipped_images": skips.total}
    log.print(f"epoch {epoch + 1}/{args.epochs} step {step}/{total_steps} loss {record['loss']:.4f} "
              f"lr {record['lr']:.4g} m {args.momentum:.4f} {record['pairs_per_s']:.0f} pairs/s "
              f"data {100 * record['data_wait']:.0f}% rankme {record['rankme']:.1f}/{min(EMBED_DIM, len(keys))} "
              f"eta {datetime.timedelta(seconds=round(record['eta_s']))} mem {record['peak_mem_gb']:.2f}G"
              + (f" skipped {skips.total}" if skips.total else ""))
    log.json(record)


def monitor(backbone, args, env, log, progress, when):
    """The kNN monitor (knn.monitor), its time left out of the next log line's speed."""
    tic = time.perf_counter()
    result = knn.monitor(backbone, args, env)
    progress.tic += time.perf_counter() - tic
    log.print(f"{when} kNN " + " ".join(f"{k} {v:.2f}" for k, v in result.items()))
    return result


# ------------------------------------------------------------------------------------------------
# What a run shows: its closing lines, from its own log
# ------------------------------------------------------------------------------------------------

SUMMARY_POINTS = 3  # log points averaged at each end of the run, so that one batch's noise does not decide
COLLAPSED_RANK = 0.1  # RankMe below this share of its maximum: the embedding is collapsing (towards rank 1)


def closing_lines(records, rank_max, ckpt_path, device, bank=0):
    """What the run shows, from its log's records: its first SUMMARY_POINTS log points against its last ones
    (the loss, RankMe), and whether the features are useful: the kNN monitor of the untrained network
    against the last one, else how to measure it on this machine. bank: the monitor's --knn-subset."""
    steps = [r for r in records if "event" not in r]
    n = min(SUMMARY_POINTS, len(steps) // 2)
    if n == 0:
        return [f"{len(steps)} log point(s), too few to compare the start with the end: log more often (--log-every)."]
    first, last = steps[:n], steps[-n:]
    loss, rank = ([sum(r[key] for r in part) / n for part in (first, last)] for key in ("loss", "rankme"))
    lines = [f"steps {first[0]['step']}-{first[-1]['step']} against {last[0]['step']}-{last[-1]['step']} "
             f"(means of {n} log points): loss {loss[0]:.4f} -> {loss[1]:.4f}, "
             f"RankMe {rank[0]:.1f} -> {rank[1]:.1f} of {rank_max}",
             ("The loss fell: the objective is being optimised; " if loss[1] < loss[0] else
              "The loss did not fall: the objective is not (yet) being optimised; ") +
             ("RankMe is far from 1: the embedding has not collapsed." if rank[1] >= COLLAPSED_RANK * rank_max else
              f"RankMe is below {COLLAPSED_RANK:.0%} of its maximum: the embedding is collapsing.")]
    knn = {r["step"]: r["knn"] for r in records if "knn" in r}
    if 0 in knn and max(knn) > 0:
        (k, untrained), (_, trained) = (next(kv for kv in knn[s].items() if kv[0].startswith("top1@"))
                                        for s in (0, max(knn)))
        where = f"a bank of {bank} training images" if bank else "all training images as the bank"
        return lines + [f"kNN top-1 (k = {k.removeprefix('top1@')}, {where}): {untrained:.2f}% untrained, "
                        f"{trained:.2f}% after step {max(knn)}: "
                        + (f"the features are {trained - untrained:.2f} points more useful than the same network's "
                           "untrained." if trained > untrained else
                           "the features are not (yet) more useful than the same network's untrained.")]
    subset = " --knn-subset 10000" if device.type == "cpu" else ""  # a bank that a CPU extracts in minutes
    return lines + ["Neither shows that the features are useful; a kNN against the same network untrained does: "
                    f"python3 eval_knn.py --ckpt {shlex.quote(str(ckpt_path))}{subset}, then the same with --random-init."]


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def crop_size(text):
    """argparse type of --img-size: at least the small stem's minimum; the ImageNet stem's is checked
    once the stem is known (require_img_size)."""
    value, least = int(text), min_img_size(small_stem=True)
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} px is below {least}, the smallest crop a ResNet here can process: "
                                         f"even with the small stem it downsamples {least}x")
    return value


def add_network_flags(parser, from_checkpoint=False):
    """--arch and --img-size, as every script takes them; from_checkpoint: they default to the checkpoint's
    (the downstream scripts), else to the pretraining defaults."""
    theirs = "the checkpoint's, else " if from_checkpoint else ""
    parser.add_argument("--arch", default=None if from_checkpoint else "resnet50",
                        help="any torchvision ResNet (resnet18, resnet50, wide_resnet50_2, ...) or resnet10/18/34-wW, "
                             "W channels wide after the stem (torchvision's 64), e.g. resnet10-w16"
                             + ("; default: the checkpoint's, else resnet50" if from_checkpoint else ""))
    parser.add_argument("--img-size", type=crop_size, default=None,
                        help=f"crop size; default: {theirs}the data set's native size (224 for an ImageFolder). Small "
                             "data sets and crops up to 64 px get the small stem (a 3x3 stride-1 first conv, no "
                             "max-pool). At least 8 px (32 with the ImageNet stem), the factor by which the network "
                             "downsamples.")


def get_parser():
    p = argparse.ArgumentParser(
        prog="mdra.py", formatter_class=runtime.HelpFormatter,
        description="MDRA self-supervised pretraining. The defaults are the patent's ImageNet run once --data "
                    "names ImageNet; without --data, Fashion-MNIST with the small-data preset.")
    method = p.add_argument_group("the method (MDRA_SPEC.md sections 3-5); each ablation turns one part off")
    a = method.add_argument
    a("--groups", type=int, default=4,
      help="G subspaces; must divide 256. 1 is an ablation: plain relation alignment (without spec section 4)")
    a("--tau", type=runtime.finite_float, default=0.04, help="temperature of the online relation P")
    a("--mu", type=runtime.finite_float, default=0.05, help="temperature of the Sinkhorn (offline) relation R")
    a("--sinkhorn-iters", type=int, default=3,
      help="Sinkhorn-Knopp iterations; 0 is an ablation without the balance constraint (spec section 3): "
           "R is a plain row softmax of K/mu, as in ReSSL")
    a("--momentum", type=runtime.finite_float, default=0.99, help="EMA momentum m of the offline encoder")
    a("--queue-size", type=int, default=None, help="N negatives; default 65536 (ImageNet) or 4096 (small data)")
    a("--predictor", action=argparse.BooleanOptionalAction, default=True,
      help="the online predictor h (spec sections 2-3); --no-predictor is an ablation: q = g(f(v))")
    a("--cross", action=argparse.BooleanOptionalAction, default=True,
      help="cross alignment (spec section 3): each view's online relation is pulled towards the other view's "
           "offline one; --no-cross is an ablation that pulls it towards its own view's")

    recipe = p.add_argument_group("the recipe (spec section 6): network, optimizer, schedule, augmentation")
    add_network_flags(recipe)
    a = recipe.add_argument
    a("--hidden-dim", type=int, default=4096, help="hidden width of the projector g and predictor h")
    a("--epochs", type=int, default=200, help="length of the schedule")
    a("--batch-size", type=int, default=None,
      help="global micro-batch over all ranks; default 512 (ImageNet) or 256 (small data)")
    a("--accum-steps", type=int, default=None,
      help="micro-batches per optimizer step; default 8 (ImageNet: 512 x 8 = 4096) or 1 (small data)")
    a("--lr", type=runtime.finite_float, default=0.3,
      help="LARS learning rate per 256 images; scaled by batch x accumulation / 256")
    a("--weight-decay", type=runtime.finite_float, default=1e-6, help="LARS weight decay (not on biases and BatchNorm)")
    a("--warmup-epochs", type=runtime.finite_float, default=10, help="linear warm-up before the cosine decay")
    a("--solarize", type=runtime.finite_float, default=0.0,
      help="probability of solarizing view 2 (off in the patent's recipe)")

    data_flags = p.add_argument_group("data")
    runtime.add_data_flags(data_flags, data.SMALL_DATASETS)
    data_flags.add_argument(
        "--gpu-aug", action=argparse.BooleanOptionalAction, default=False,
        help="hold an in-memory data set (" + ", ".join(data.SMALL_DATASETS) + ") on the device and make its views "
             "there in batches, without loader workers (gpu_aug.py). Off until a GPU measurement shows it faster")

    run = p.add_argument_group("run and resume")
    runtime.add_run_flags(run, "runs/mdra", ("none", "loss", "networks", "all"),
                          compile_help=" (the networks and the loss); loss: the relation alignment with its Sinkhorn "
                                       "iterations, memory-bound, which compiling fuses; default: networks on CUDA, "
                                       "none on the CPU (where the loss ran 1.6-2.1x faster compiled, but a short run "
                                       "did not win back its compile time)")
    a = run.add_argument
    a("--keep-every", type=int, default=50, help="keep a copy checkpoint_epochNNNN.pth every this many epochs (0: never)")
    a("--knn-every", type=int, default=0,
      help="weighted-kNN evaluation every this many epochs, of the untrained network first (0: never)")
    a("--knn-subset", type=int, default=0, help="number of training images in the kNN bank (0: all)")
    return p


def resolve_args(args, info, env):
    """Fill the data-dependent defaults (spec section 6) and check what cannot work."""
    small = info.small
    defaults = {"img_size": info.native_size, "batch_size": 256 if small else 512, "accum_steps": 1 if small else 8,
                "queue_size": 4096 if small else 65536}
    for name, value in defaults.items():
        setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    args.small_stem = small or args.img_size <= 64
    runtime.resolve_speed_flags(args, env, compile_default=("networks", "none"))
    require_img_size(args.img_size, args.small_stem)
    runtime.require_at_least(1, args, "epochs", "batch_size", "accum_steps", "queue_size", "groups", "hidden_dim",
                             "log_every", "save_every")
    runtime.require_at_least(0, args, "max_steps", "workers", "keep_every", "knn_every", "knn_subset", "warmup_epochs",
                             "lr", "weight_decay", "sinkhorn_iters")
    for name in ("tau", "mu", "momentum", "solarize"):
        value, unit = getattr(args, name), name in ("momentum", "solarize")
        if not (0 <= value <= 1 if unit else value > 0):
            raise UsageError(f"--{name} {value} " + ("is not in [0, 1]." if unit else "must be positive."))
    if args.warmup_epochs > args.epochs:
        raise UsageError(f"--warmup-epochs {args.warmup_epochs:g} does not fit in --epochs {args.epochs}: the learning "
                         "rate would never reach its peak; give fewer warm-up epochs.")
    if args.knn_every > args.epochs or args.knn_subset and not args.knn_every:
        raise UsageError(f"--knn-every {args.knn_every} and --knn-subset {args.knn_subset} with --epochs {args.epochs}: "
                         "the kNN monitor would never run.")
    if EMBED_DIM % args.groups:
        raise UsageError(f"--groups {args.groups} does not divide the embedding dimension {EMBED_DIM}.")
    if args.batch_size % env.world_size:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the world size {env.world_size}.")
    if args.queue_size % args.batch_size:
        raise UsageError(f"--queue-size {args.queue_size} is not a multiple of the global batch {args.batch_size}.")
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
