"""gpu_aug.py (mdra.py --gpu-aug): the views of an in-memory data set made in batches, here on CPU tensors.

Each operation is compared with torchvision's functions applied image by image (float64 where torchvision
computes in it), the parameters with torchvision's get_params and the views with the CPU path
(mdra.view_transform on PIL images). All randomness is seeded, so a test either always passes or always
fails; the statistical tolerances say how far two samples of the stated sizes may differ by chance (about
4.5 standard errors, or a two-sample Kolmogorov-Smirnov distance at the 0.1% level), so that they catch a
wrong distribution, not sampling noise.
"""
import colorsys
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

import data
import gpu_aug
import mdra

CPU = torch.device("cpu")
IMAGENET = data.DataInfo("imagenet", 1000, [], 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False)
SMALL = data.DataInfo("small", 10, [], 12, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), True)
PLAIN = mdra.ViewAugmentation(size=(8, 8), scale=(1.0, 1.0), ratio=(1.0, 1.0))  # nothing but a whole-image crop
TINY = ["--no-compile", "--warmup-epochs", "1", "--arch", "resnet10-w8", "--hidden-dim", "32", "--img-size", "16", "--workers", "0", "--log-every", "1",
        "--device", "cpu", "--gpu-aug"]


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    grid = np.concatenate([a, b])
    cdf_a, cdf_b = (np.searchsorted(x, grid, side="right") / len(x) for x in (a, b))
    return np.abs(cdf_a - cdf_b).max()


def ks_limit(n, m):
    """The KS distance two samples of one distribution exceed with probability 0.1%."""
    return math.sqrt(-math.log(0.0005) / 2) * math.sqrt((n + m) / (n * m))


def assert_rate(hits, p, name):
    n = len(hits)
    assert abs(float(np.mean(hits)) - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1e-12, name


def col(u, name):
    """The uniforms of one parameter, as gpu_aug.COLUMNS lays them out: [n] or [n, width]."""
    first, width = gpu_aug.COLUMNS[name]
    return u[:, first] if width == 1 else u[:, first:first + width]


def draws(n, seed):
    return gpu_aug.uniforms(n, torch.Generator().manual_seed(seed))


def env(rank=0, world_size=1):
    """What DeviceViews reads of runtime.setup_distributed's environment."""
    return SimpleNamespace(device=CPU, rank=rank, world_size=world_size)


def array_images(n, channels, size=12, seed=0):
    """n random uint8 images as data.ArrayImages: [n, H, W] if grey (channels 1), else [n, H, W, 3]."""
    shape = (n, size, size) if channels == 1 else (n, size, size, 3)
    return data.ArrayImages(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), [0] * n, ["a"])


def jitter_view(op, low_high):
    """A view that only applies one colour operation (0-3: brightness, contrast, saturation, hue), always."""
    ranges = [None] * 4
    ranges[op] = low_high
    return replace(PLAIN, jitter_p=1.0, jitter=tuple(ranges))


# ------------------------------------------------------------------------------------------------
# The operations, image by image against torchvision
# ------------------------------------------------------------------------------------------------

def test_each_colour_operation_equals_torchvisions_image_by_image():
    x = torch.rand(6, 3, 12, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[0] = 0.5  # grey: hue undefined, saturation 0
    x[1, :, :2] = 1.0  # ties between channels at the maximum
    x[2, :2, 3:5] = 0.7  # red and green tied
    x[3, :, 5] = 0.0  # black
    factors = {TF.adjust_brightness: [0.6, 0.8, 1.0, 1.2, 1.4, 0.7],
               TF.adjust_contrast: [0.6, 0.9, 1.0, 1.1, 1.4, 1.3],
               TF.adjust_saturation: [0.8, 0.9, 1.0, 1.05, 1.2, 0.85],
               TF.adjust_hue: [-0.5, -0.05, 0.0, 0.03, 0.1, 0.5]}
    everything = torch.ones(6, 1, 1, 1, dtype=torch.bool)
    for op, (theirs, f) in enumerate(factors.items()):
        low_high = (-0.5, 0.5) if op == 3 else (0.0, 2.0)  # factor = low + (high - low) u
        view, u = jitter_view(op, low_high), torch.zeros(6, 4, dtype=torch.float64)
        u[:, op] = (torch.tensor(f, dtype=torch.float64) - low_high[0]) / (low_high[1] - low_high[0])
        mine = gpu_aug.color_jitter(x.clone(), view, torch.arange(4).repeat(6, 1), u, everything)
        expected = torch.stack([theirs(image, factor) for image, factor in zip(x, f)])
        # torchvision rotates hues in float32 whatever the images' dtype
        torch.testing.assert_close(mine, expected, atol=2e-6 if op == 3 else 1e-12, rtol=0, msg=theirs.__name__)
    # The hue rotation in float64 against the standard library's HSV conversions, pixel by pixel.
    shift = torch.tensor(factors[TF.adjust_hue], dtype=torch.float64)
    rotated = gpu_aug.adjust_hue(x, shift.view(-1, 1, 1, 1))
    pixels = x.permute(0, 2, 3, 1).reshape(6, -1, 3).tolist()
    expected = torch.tensor([[colorsys.hsv_to_rgb((h + s) % 1, sat, v) for h, sat, v in
                              (colorsys.rgb_to_hsv(*p) for p in image)] for image, s in zip(pixels, shift.tolist())],
                            dtype=torch.float64).view(6, 12, 16, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(rotated, expected, atol=1e-12, rtol=0)
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(gpu_aug.grayscale(x.to(dtype)), TF.rgb_to_grayscale(x.to(dtype)))


def test_colour_jitter_follows_each_images_own_order_and_skips_unselected_images_and_operations_without_a_range():
    generator = torch.Generator().manual_seed(1)
    n = 24
    x = torch.rand(n, 3, 6, 6, generator=generator, dtype=torch.float64)
    order = torch.rand(n, 4, generator=generator).argsort(dim=1)  # per image, its operations in the order applied
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    apply = torch.rand(n, generator=generator) < 0.8
    assert 0 < apply.sum() < n and len({tuple(o) for o in order.tolist()}) > 12
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    full = (0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)
    for ranges in (full, ((0.6, 1.4), None, (0.8, 1.2), None)):  # ColorJitter leaves out an operation of range 0
        view = replace(PLAIN, jitter_p=0.8, jitter=ranges)
        mine = gpu_aug.color_jitter(x.clone(), view, order, u, apply.view(-1, 1, 1, 1))
        jitter = T.ColorJitter(*(0 if r is None else r for r in ranges))
        ops = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        for i in range(n):
            expected = x[i]
            for op in order[i].tolist() if apply[i] else []:
                if ops[op] is not None:
                    low, high = ops[op]
                    expected = adjust[op](expected, low + (high - low) * u[i, op].item())
            torch.testing.assert_close(mine[i], expected, atol=2e-6, rtol=0, msg=f"image {i}")
            if not apply[i]:
                assert torch.equal(mine[i], x[i])


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_gaussian_blur_equals_torchvisions_with_each_images_sigma(dtype, tolerance):
    x = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(2), dtype=dtype)
    sigma = torch.tensor([0.1, 0.9, 2.0], dtype=torch.float64)
    for kernel in (5, 7):
        expected = torch.stack([TF.gaussian_blur(image, [kernel] * 2, [s, s]) for image, s in zip(x, sigma.tolist())])
        torch.testing.assert_close(gpu_aug.gaussian_blur(x, kernel, sigma), expected, atol=tolerance, rtol=0)


def reference_view(image, view, u):
    """The CPU path's steps after the crop, read from its transforms (mdra.view_transform), as torchvision's
    functions on a float64 image [3, H, W] in [0, 1], each random choice made from the image's uniforms u
    as gpu_aug.COLUMNS lays them out."""
    x, u = image, u[None]
    for step in mdra.view_transform(view).transforms[1:]:  # after the crop
        inner = step.transforms[0] if isinstance(step, T.RandomApply) else step
        if isinstance(step, T.RandomHorizontalFlip) and col(u, "flip") < step.p:
            x = TF.hflip(x)
        elif isinstance(inner, T.ColorJitter) and col(u, "jitter") < step.p:
            ops = list(zip((inner.brightness, inner.contrast, inner.saturation, inner.hue),
                           (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)))
            for op in col(u, "order")[0].argsort().tolist():  # torch.randperm(4), as uniforms sorted
                (low_high, adjust), f = ops[op], col(u, "factors")[0, op].item()
                x = x if low_high is None else adjust(x, low_high[0] + (low_high[1] - low_high[0]) * f)
        elif isinstance(step, T.RandomGrayscale) and col(u, "grey") < step.p:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        elif isinstance(inner, T.GaussianBlur) and col(u, "blur") < step.p:
            sigma = inner.sigma[0] + (inner.sigma[1] - inner.sigma[0]) * col(u, "sigma").item()
            x = TF.gaussian_blur(x, list(inner.kernel_size), [sigma, sigma])
        elif isinstance(step, T.RandomSolarize) and col(u, "solarize") < step.p:
            x = TF.solarize(x, step.threshold / 255)
        elif isinstance(step, T.Normalize):
            x = TF.normalize(x, step.mean, step.std)
    return x


@pytest.mark.parametrize("channels", [3, 1])  # grey images: cropped as one channel, then RGB
def test_everything_after_the_crop_equals_torchvisions_functions_applied_image_by_image(channels):
    n, size = 24, 40  # 40 px: blur on (kernel 5); solarize on in view 2
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(3))
    for number, view in enumerate(mdra.view_augmentations(replace(IMAGENET, native_size=size), size, solarize=0.5), 1):
        view = replace(view, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # the whole image, at its own size
        u = draws(n, 3 + number)
        for name in ("flip", "jitter", "grey", "blur", "solarize"):
            p, chosen = getattr(view, f"{name}_p"), int((col(u, name) < getattr(view, f"{name}_p")).sum())
            # the sample has images with and without each operation that is not always or never applied
            assert (0 < chosen < n) if 0 < p < 1 else chosen == n * p, (name, number)
        mine = gpu_aug.augment(images, view, u)
        assert mine.shape == (n, 3, size, size) and mine.dtype == torch.float32
        for i in range(n):
            expected = reference_view(images[i].expand(3, -1, -1).double() / 255, view, u[i])
            torch.testing.assert_close(mine[i].double(), expected, atol=2e-5, rtol=0, msg=f"view {number} image {i}")


# ------------------------------------------------------------------------------------------------
# The crop
# ------------------------------------------------------------------------------------------------

def get_params_with_these_draws(u, height, width, scale, ratio, monkeypatch):
    """torchvision's RandomResizedCrop.get_params itself, for one image, its draws taken from its uniforms
    u: the areas and log aspect ratios of the tries in turn, then the top and left positions."""
    tries = iter(zip(col(u[None], "area")[0].tolist(), col(u[None], "log_ratio")[0].tolist()))
    uniforms, positions = [], iter(col(u[None], "position")[0].tolist())

    class Draw:
        def uniform_(self, low, high):
            if not uniforms:
                uniforms.extend(next(tries))
            return torch.tensor([float(low) + (float(high) - float(low)) * uniforms.pop(0)], dtype=torch.float64)

    def randint(low, high, size):
        return torch.tensor([low + math.floor(next(positions) * (high - low))])

    image = torch.zeros(1, height, width)
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", lambda *shape: Draw())
        m.setattr(torch, "randint", randint)
        return T.RandomResizedCrop.get_params(image, scale, ratio)


@pytest.mark.parametrize("height,width,scale", [
    (375, 500, (0.08, 1.0)), (60, 400, (0.08, 1.0)),  # ImageNet-like; so wide that few tries fit
    (60, 400, (0.9, 1.0)), (400, 60, (0.9, 1.0)),  # too wide or too tall for any try: the central fallback
])
def test_each_crop_box_is_what_random_resized_crop_get_params_returns_for_the_images_draws(height, width, scale,
                                                                                             monkeypatch):
    n = 300
    view = replace(PLAIN, scale=scale, ratio=(3 / 4, 4 / 3))
    u = draws(n, 5)
    boxes = gpu_aug.crop_boxes(u, height, width, view)
    assert boxes.dtype == torch.float64
    for i in range(n):
        top, left, h, w = get_params_with_these_draws(u[i], height, width, view.scale, view.ratio, monkeypatch)
        assert boxes[i].tolist() == [left, top, left + w, top + h], i


@pytest.mark.parametrize("height,width", [(375, 500), (60, 400)])
def test_crop_boxes_follow_torchvisions_random_resized_crop(height, width):
    n = 4000
    view = mdra.ViewAugmentation(size=(224, 224), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    boxes = gpu_aug.crop_boxes(draws(n, 0), height, width, view).numpy()
    ours = {"top": boxes[:, 1], "left": boxes[:, 0], "h": boxes[:, 3] - boxes[:, 1], "w": boxes[:, 2] - boxes[:, 0]}
    torch.manual_seed(0)
    image = torch.empty(1, height, width)
    theirs = np.array([T.RandomResizedCrop.get_params(image, view.scale, view.ratio) for _ in range(n)])
    theirs = dict(zip(("top", "left", "h", "w"), theirs.T))
    assert (ours["top"] >= 0).all() and (ours["top"] + ours["h"] <= height).all()
    assert (ours["left"] >= 0).all() and (ours["left"] + ours["w"] <= width).all()
    for key in ours:
        assert ks_distance(ours[key], theirs[key]) < ks_limit(n, n), key


@pytest.mark.parametrize("height,width,scale,ratio", [
    (60, 400, (0.9, 1.0), (3 / 4, 4 / 3)),   # too wide for any try: the widest allowed crop, centred
    (400, 60, (0.9, 1.0), (3 / 4, 4 / 3)),   # too tall: the tallest allowed crop, centred
    (90, 100, (1.1, 1.2), (3 / 4, 4 / 3)),   # more than the whole area never fits: the whole image
    (37, 100, (1.1, 1.2), (1 / 2, 2.35)),    # the widest allowed crop's width, 86.95, rounded; centred at 6.5
    (100, 37, (1.1, 1.2), (0.39, 2.0)),      # the tallest allowed crop's height, 94.87, rounded; centred at 2.5
])
def test_when_no_try_fits_the_crop_is_torchvisions_central_fallback(height, width, scale, ratio):
    boxes = gpu_aug.crop_boxes(draws(5, 0), height, width, replace(PLAIN, scale=scale, ratio=ratio))
    top, left, h, w = T.RandomResizedCrop.get_params(torch.empty(1, height, width), scale, ratio)
    assert boxes.tolist() == [[left, top, left + w, top + h]] * 5


@pytest.mark.parametrize("channels", [3, 1])
def test_a_whole_image_crop_at_its_own_size_is_the_image(channels):
    images = torch.randint(0, 256, (4, channels, 12, 20), dtype=torch.uint8)
    view = replace(PLAIN, size=(12, 20), ratio=(20 / 12, 20 / 12))
    out = gpu_aug.augment(images, view, draws(4, 0))
    assert out.shape == (4, 3, 12, 20) and out.dtype == torch.float32
    assert torch.equal(out, (images.float() / 255).expand(-1, 3, -1, -1))


def test_upscaling_a_crop_is_bilinear_interpolation():
    images = torch.randint(0, 256, (3, 3, 9, 11), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    whole = gpu_aug.augment(images, replace(PLAIN, size=(18, 22), ratio=(11 / 9, 11 / 9)), draws(3, 0))
    expected = F.interpolate(images.double(), size=(18, 22), mode="bilinear", align_corners=False) / 255
    torch.testing.assert_close(whole.double(), expected, atol=1e-6, rtol=0)
    # A 5 x 5 crop, inside (away from its border, where the crop may read the pixels just outside it).
    view, u = replace(PLAIN, size=(20, 20), scale=(25 / 99, 25 / 99)), draws(3, 1)
    left, top = gpu_aug.crop_boxes(u, 9, 11, view)[:, :2].long().T.tolist()
    crops = gpu_aug.augment(images, view, u)
    for i in range(3):
        crop = images[i:i + 1, :, top[i]:top[i] + 5, left[i]:left[i] + 5].double()
        inner = F.interpolate(crop, size=(20, 20), mode="bilinear", align_corners=False)[0] / 255
        torch.testing.assert_close(crops[i, :, 2:-2, 2:-2].double(), inner[:, 2:-2, 2:-2], atol=1e-6, rtol=0)


def test_downscaling_a_crop_by_three_averages_each_three_by_three_block():
    images = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    view, u = replace(PLAIN, size=(6, 6), scale=(0.5625, 0.5625)), draws(4, 2)  # 18 x 18 crops, not aliased
    boxes = gpu_aug.crop_boxes(u, 24, 24, view).long()
    assert ((boxes[:, 2:] - boxes[:, :2]) == 18).all() and len({tuple(b) for b in boxes.tolist()}) > 1
    out = gpu_aug.augment(images, view, u)
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        expected = F.avg_pool2d(images[i, :, y1:y2, x1:x2].double(), 3) / 255
        torch.testing.assert_close(out[i].double(), expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# Random parameters and whole views against the CPU path
# ------------------------------------------------------------------------------------------------

def test_parameter_rates_and_ranges_follow_the_cpu_transforms():
    n = 20000
    view1, view2 = mdra.view_augmentations(IMAGENET, 224, solarize=0.2)
    cpu = {type(t.transforms[0] if isinstance(t, T.RandomApply) else t): t
           for view in (view1, view2) for t in mdra.view_transform(view).transforms}  # view 2's, where both have it
    # The rate of each operation, as augment applies it to small images with the view's probability alone.
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    x = images.float() / 255
    u = draws(n, 6)
    alone = replace(PLAIN, jitter=view2.jitter, blur_kernel=3, blur_sigma=(1.0, 1.0))  # a blur that shows
    transforms = {"flip": T.RandomHorizontalFlip, "jitter": T.ColorJitter, "grey": T.RandomGrayscale,
                  "blur": data.GaussianBlur, "solarize": T.RandomSolarize}
    for name, transform in transforms.items():
        out = gpu_aug.augment(images, replace(alone, **{f"{name}_p": getattr(view2, f"{name}_p")}), u)
        changed = (out != x).flatten(1).any(dim=1)
        if name == "flip":  # flipped or not, and nothing else
            assert torch.equal(out[changed], x[changed].flip(-1))
        if name == "grey":
            assert (out[changed] == out[changed][:, :1]).all()
        assert_rate(changed.numpy(), cpu[transform].p, name)
    # The factors, order and sigma (drawn as test_everything_after_the_crop... reads them) against get_params.
    torch.manual_seed(6)
    jitter, blur = cpu[T.ColorJitter].transforms[0], cpu[data.GaussianBlur].transforms[0]
    theirs = [jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) for _ in range(4000)]
    their_factors = np.array([t[1:] for t in theirs])
    for i, (low, high) in enumerate(view2.jitter):
        mine = low + (high - low) * col(u, "factors")[:, i]
        assert ks_distance(mine, their_factors[:, i]) < ks_limit(n, 4000), i
    # Each of the 24 orders is as likely as with torch.randperm(4): chi-square over the orders, with 23
    # degrees of freedom, is over 71 with probability 1e-6.
    codes = (col(u, "order").argsort(dim=1) * torch.tensor([64, 16, 4, 1])).sum(dim=1)
    counts = torch.bincount(codes, minlength=256)
    counts = counts[counts > 0].double()
    assert len(counts) == 24 and float(((counts - n / 24) ** 2 / (n / 24)).sum()) < 71
    their_sigma = [blur.get_params(*blur.sigma) for _ in range(4000)]
    mine = view1.blur_sigma[0] + (view1.blur_sigma[1] - view1.blur_sigma[0]) * col(u, "sigma")
    assert ks_distance(mine, their_sigma) < ks_limit(n, 4000)


def test_views_match_the_cpu_path_in_per_image_mean_and_std():
    n, size = 600, 40  # 40 px: blur on, as at 224 px
    views = mdra.view_augmentations(replace(IMAGENET, native_size=size), size, solarize=0.3)
    pattern = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(4))
    image = (F.interpolate(pattern[None], size=(50, 66), mode="bicubic", align_corners=False)[0].clamp(0, 1) * 255)
    image = image.round().to(torch.uint8)
    torch.manual_seed(4)
    pil = TF.to_pil_image(image)
    generator = torch.Generator().manual_seed(4)
    for number, view in enumerate(views, 1):
        transform = mdra.view_transform(view)  # the CPU path
        theirs = torch.stack([transform(pil) for _ in range(n)])
        mine = gpu_aug.augment(image.expand(n, 3, 50, 66), view, gpu_aug.uniforms(n, generator))
        for statistic in (lambda v: v.mean(dim=(1, 2, 3)), lambda v: v.std(dim=(1, 2, 3)),
                          lambda v: v.mean(dim=(2, 3))[:, 0] - v.mean(dim=(2, 3))[:, 2],
                          lambda v: v[..., :size // 2].mean(dim=(1, 2, 3)) - v[..., size // 2:].mean(dim=(1, 2, 3))):
            assert ks_distance(statistic(mine), statistic(theirs)) < ks_limit(n, n), f"view {number}"


# ------------------------------------------------------------------------------------------------
# DeviceViews: the micro-batches of an epoch
# ------------------------------------------------------------------------------------------------

def epoch_views(images, views, epoch, start_batch=0, batch=8, num_batches=4, seed=3, rank=0, world_size=1):
    sampler = data.EpochSampler(len(images), batch, num_batches, world_size, rank, seed)
    sampler.set_epoch(epoch, start_batch)
    return list(gpu_aug.DeviceViews(images, views, sampler, seed, env(rank, world_size)))


def test_the_views_of_a_micro_batch_are_its_images_augmented_with_uniforms_seeded_by_seed_epoch_and_batch():
    images, views = array_images(32, 3), mdra.view_augmentations(SMALL, 12)
    held = images.as_tensor()
    made = epoch_views(images, views, epoch=2)
    assert len(made) == 4
    sampler = data.EpochSampler(32, 8, 4, 1, 0, seed=3)
    sampler.set_epoch(2)
    for b, ((v1, v2, skipped, unread), indices) in enumerate(zip(made, sampler.batches())):
        generator = torch.Generator().manual_seed(data.sample_seed(3, 2, b))
        batch = held[indices]
        assert torch.equal(v1, gpu_aug.augment(batch, views[0], gpu_aug.uniforms(8, generator)))
        assert torch.equal(v2, gpu_aug.augment(batch, views[1], gpu_aug.uniforms(8, generator)))
        assert v1.shape == (8, 3, 12, 12) and skipped.tolist() == [0] * 8 and not unread
    resumed = epoch_views(images, views, epoch=2, start_batch=2)  # a resumed epoch: its later micro-batches
    assert len(resumed) == 2 and all(torch.equal(a[k], b[k]) for a, b in zip(made[2:], resumed) for k in (0, 1))
    # One image everywhere: only the parameters differ between micro-batches, epochs and seeds.
    same = data.ArrayImages(np.repeat(images.images[:1], 32, axis=0), [0] * 32, ["a"])
    first = epoch_views(same, views, epoch=2)
    assert torch.equal(first[0][0], epoch_views(same, views, epoch=2)[0][0])
    others = [first[1][0], epoch_views(same, views, epoch=3)[0][0], epoch_views(same, views, 2, seed=4)[0][0]]
    assert not any(torch.equal(first[0][0], other) for other in others)
    assert not torch.equal(first[0][0], first[0][1])  # view 2 draws after view 1


@pytest.mark.parametrize("channels", [1, 3])  # grey images stay one channel on the device
def test_two_ranks_make_exactly_the_rows_of_the_single_process_views(channels):
    images, views = array_images(32, channels), mdra.view_augmentations(SMALL, 12, solarize=0.5)
    whole = epoch_views(images, views, 1, start_batch=1)
    ranks = [epoch_views(images, views, 1, start_batch=1, rank=rank, world_size=2) for rank in range(2)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == 3
    for b, made in enumerate(whole):
        for view in (0, 1):
            assert ranks[0][b][view].shape == (4, 3, 12, 12)
            assert torch.equal(torch.cat([ranks[0][b][view], ranks[1][b][view]]), made[view]), (b, view)


@pytest.mark.parametrize("images", [array_images(6, 1, size=5), array_images(6, 3, size=5), data.SyntheticImages(6, 5)],
                         ids=["grey", "colour", "synthetic"])
def test_the_held_images_are_the_pixels_the_cpu_path_reads_grey_ones_as_one_channel(images):
    sampler = data.EpochSampler(len(images), 2, 3, 1, 0, seed=0)
    held = gpu_aug.DeviceViews(images, mdra.view_augmentations(SMALL, 8), sampler, 0, env()).images
    grey = isinstance(images, data.ArrayImages) and images.images.ndim == 3
    assert held.dtype == torch.uint8 and held.shape == (6, 1 if grey else 3, 5, 5)
    expected = torch.stack([TF.pil_to_tensor(images[i][0]) for i in range(6)])  # the RGB images TwoViews reads
    assert torch.equal(held.expand(-1, 3, -1, -1), expected)


def host_ops_per_micro_batch(batch):
    """The aten operations that DeviceViews dispatches for the second micro-batch of an epoch (the first
    also draws the epoch's order)."""
    images = data.ArrayImages(np.zeros((2 * batch, 12, 12), dtype=np.uint8), [0] * (2 * batch), ["a"])
    sampler = data.EpochSampler(2 * batch, batch, 2, 1, 0, seed=0)
    micro_batches = iter(gpu_aug.DeviceViews(images, mdra.view_augmentations(SMALL, 12), sampler, 0, env()))
    next(micro_batches)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        next(micro_batches)
    return sum(event.count for event in profiler.key_averages() if event.key.startswith("aten::"))


def test_host_operations_per_micro_batch_do_not_grow_with_the_batch():
    few = host_ops_per_micro_batch(16)
    assert few > 50 and few == host_ops_per_micro_batch(128)


# ------------------------------------------------------------------------------------------------
# mdra.py --gpu-aug
# ------------------------------------------------------------------------------------------------

def test_gpu_aug_is_off_by_default_and_a_resumed_run_keeps_it():
    parse = mdra.get_parser().parse_args
    assert parse([]).gpu_aug is False and parse(["--no-gpu-aug"]).gpu_aug is False and parse(["--gpu-aug"]).gpu_aug
    assert "gpu_aug" not in mdra.RESUME_MAY_CHANGE  # its views differ from the CPU loader's


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    else:
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, path


def test_mdra_gpu_aug_trains_on_synthetic_data_and_an_interrupted_run_resumes_bit_for_bit(tmp_path):
    # 2 optimizer steps an epoch of 2 micro-batches each; the resumed run starts at micro-batch 2 of epoch 2.
    run = ["--data", "synthetic:32", "--epochs", "2", "--batch-size", "8", "--accum-steps", "2", "--queue-size", "32",
           "--warmup-epochs", "0", *TINY]
    straight = load(mdra.main([*run, "--out-dir", str(tmp_path / "straight")]))
    interrupted = load(mdra.main([*run, "--out-dir", str(tmp_path / "resumed"), "--max-steps", "3"]))
    resumed = load(mdra.main([*run, "--out-dir", str(tmp_path / "resumed")]))
    assert (interrupted["step"], straight["step"], resumed["step"]) == (3, 4, 4) and straight["args"]["gpu_aug"]
    assert not torch.equal(interrupted["queue"], resumed["queue"])  # the resumed run trained on
    for part in ("online", "offline", "queue", "queue_ptr", "optimizer"):
        assert_same(resumed[part], straight[part], part)
    assert torch.isfinite(straight["queue"]).all()


def test_mdra_gpu_aug_takes_a_step_on_fashion_mnist_held_as_one_grey_channel(tmp_path, monkeypatch):
    if not (Path(data.FASHION_MNIST_SYSTEM_DIR) / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed")
    held, init = [], gpu_aug.DeviceViews.__init__

    def recording(self, *args):
        init(self, *args)
        held.append(self.images)

    monkeypatch.setattr(gpu_aug.DeviceViews, "__init__", recording)
    args = [*TINY, "--data", "fashion-mnist", "--data-dir", str(tmp_path / "none"), "--img-size", "28",
            "--batch-size", "16", "--queue-size", "64", "--max-steps", "1", "--out-dir", str(tmp_path / "run")]
    ckpt = load(mdra.main(args))
    assert ckpt["step"] == 1 and ckpt["args"]["img_size"] == 28 and torch.isfinite(ckpt["queue"]).all()
    assert len(held) == 1 and held[0].shape == (60000, 1, 28, 28) and held[0].dtype == torch.uint8


def test_mdra_gpu_aug_refuses_an_image_folder_in_one_sentence_with_exit_status_2(tmp_path, capsys):
    rng = np.random.default_rng(7)
    for i in range(4):
        (tmp_path / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
        image.save(tmp_path / "data" / f"c{i % 2}" / f"{i}.png")
    with pytest.raises(SystemExit) as stopped:
        mdra.main([*TINY, "--data", str(tmp_path / "data"), "--batch-size", "4", "--accum-steps", "1",
                   "--queue-size", "8", "--out-dir", str(tmp_path / "run")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mdra.py: error: --gpu-aug ") and "image folder" in err and "Traceback" not in err
    assert "\n" not in err and err.endswith(".") and ". " not in err  # one sentence
    assert not (tmp_path / "run" / "checkpoint.pth").exists()
