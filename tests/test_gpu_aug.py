"""gpu_aug.py (mdra.py --gpu-aug): the batched two-view augmentation, on CPU tensors.

Statistical tests compare with the CPU path (torchvision's transforms on PIL images). All randomness is
seeded, so a test either always passes or always fails; the tolerances say how far two samples of the
stated sizes may differ by chance (about 4.5 standard errors, or a two-sample Kolmogorov-Smirnov
distance at the 0.1% level), so that they would catch a wrong distribution, not sampling noise.
"""
import dataclasses
import io
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T
from torchvision.ops import roi_align

import gpu_aug
import mdra
import runtime

# torchvision >= 0.29 announces that its decoders move to TorchCodec; they still work, and the GPU
# machines run an older torchvision.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
IMAGENET = mdra.DataInfo("imagenet", 1000, [], 224, mdra.IMAGENET_MEAN, mdra.IMAGENET_STD, False)


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b)).max()


def ks_limit(n, m):
    """The KS distance two samples of one distribution exceed with probability 0.1%."""
    return math.sqrt(-math.log(0.0005) / 2) * math.sqrt((n + m) / (n * m))


def assert_rate(hits, p):
    n = len(hits)
    assert abs(float(np.mean(hits)) - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1e-12


def no_op_params(n, **overrides):
    """augment_crops parameters that leave the crops unchanged except for what is overridden."""
    params = {"flip": torch.zeros(n, dtype=torch.bool), "jitter": torch.zeros(n, dtype=torch.bool),
              "jitter_order": torch.arange(4).repeat(n, 1), "jitter_factors": torch.ones(n, 4),
              "grey": torch.zeros(n, dtype=torch.bool), "blur": torch.zeros(n, dtype=torch.bool),
              "sigma": torch.ones(n), "solarize": torch.zeros(n, dtype=torch.bool)}
    params.update(overrides)
    return params


def jpeg_bytes(image, quality=90, **options):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, **options)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def test_both_views_share_one_recipe_unless_their_operations_differ():
    view1, view2 = mdra.view_augmentations(IMAGENET, 224, solarize=0.2)
    shared = gpu_aug.shared_recipe([view1, view2])  # view 1 never solarizes: view 2's threshold serves both
    assert (shared.size, shared.blur_kernel, shared.solarize_threshold) == ((224, 224), 23, 128)
    assert (shared.mean, shared.std) == (mdra.IMAGENET_MEAN, mdra.IMAGENET_STD)
    unblurred = dataclasses.replace(view2, blur_p=0.0, blur_kernel=1)  # a view without blur has no kernel
    assert gpu_aug.shared_recipe([unblurred, view1]).blur_kernel == 23
    for change in ({"size": (192, 192)}, {"blur_kernel": 21}, {"jitter": (None, *view2.jitter[1:])},
                   {"std": (1, 1, 1)}):
        with pytest.raises(ValueError, match="one batch"):
            gpu_aug.shared_recipe([view1, dataclasses.replace(view2, **change)])


def test_both_views_made_as_one_batch_equal_each_view_made_on_its_own_with_its_own_parameters():
    n, size = 12, 40  # 40 px: view 1 always blurred, view 2 sometimes, and solarized sometimes
    augmentations = mdra.view_augmentations(dataclasses.replace(IMAGENET, native_size=size), size, solarize=0.5)
    views = gpu_aug.DeviceTwoViews(*augmentations, seed=5, rank=0, world_size=1, device="cpu")
    generator = torch.Generator().manual_seed(5)
    images = [torch.randint(0, 256, (3, int(h), int(w)), dtype=torch.uint8, generator=generator)
              for h, w in torch.randint(30, 70, (n, 2), generator=generator)]
    made = views(images, torch.zeros(n, dtype=torch.long), 2, 3)[:2]
    params = views.params(n, 2, 3)  # view 1's rows, then view 2's
    assert params["blur"][:n].all() and not params["solarize"][:n].any() and params["solarize"][n:].any()
    heights, widths = (torch.tensor([image.shape[axis] for image in images]) for axis in (-2, -1))
    for view, recipe in enumerate(views.recipes):
        own = {key: value[view * n:(view + 1) * n] for key, value in params.items()}
        boxes = gpu_aug.crop_boxes(own, heights, widths, recipe.ratio)
        crops = gpu_aug.resized_crops(images, boxes[None], recipe.size) / 255
        alone = gpu_aug.augment_crops(crops, gpu_aug.augment_plan(own, recipe), recipe)
        assert torch.equal(made[view], alone), f"view {view + 1}"


def test_everything_after_the_crop_equals_torchvisions_functions_applied_image_by_image():
    n, size = 16, 40  # 40 px: blur on (kernel 5), both views' rows in one batch, solarize on in view 2
    augmentations = mdra.view_augmentations(dataclasses.replace(IMAGENET, native_size=size), size, solarize=0.5)
    views = gpu_aug.DeviceTwoViews(*augmentations, seed=7, rank=0, world_size=1, device="cpu")
    recipe, params = views.recipe, views.params(n, 0, 0)
    assert params["blur"][:n].all() and 0 < params["blur"][n:].sum() < n and recipe.blur_kernel == 5
    crops = torch.rand(2 * n, 3, 12, 14, generator=torch.Generator().manual_seed(7))  # noise: the blur shows
    out = gpu_aug.augment_crops(crops, gpu_aug.augment_plan(params, recipe), recipe)
    adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i, x in enumerate(crops):
        if params["flip"][i]:
            x = TF.hflip(x)
        if params["jitter"][i]:
            for op in params["jitter_order"][i].tolist():
                x = adjust[op](x, float(params["jitter_factors"][i, op]))
        if params["grey"][i]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if params["blur"][i]:
            sigma = float(params["sigma"][i])
            x = TF.gaussian_blur(x, [recipe.blur_kernel] * 2, [sigma, sigma])
        if params["solarize"][i]:
            x = TF.solarize(x, recipe.solarize_threshold / 255)
        expected = TF.normalize(x, recipe.mean, recipe.std)
        torch.testing.assert_close(out[i], expected, atol=2e-5, rtol=0, msg=f"crop {i} of view {i // n + 1}")


def test_colour_operations_equal_torchvisions_image_by_image():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 12, 16)
    x[0] = 0.5  # grey: hue undefined, saturation 0
    x[1, :, :2] = 1.0  # ties between channels at the maximum
    factors = {TF.adjust_brightness: torch.tensor([0.6, 0.8, 1.0, 1.2, 1.4, 0.7]),
               TF.adjust_contrast: torch.tensor([0.6, 0.9, 1.0, 1.1, 1.4, 1.3]),
               TF.adjust_saturation: torch.tensor([0.8, 0.9, 1.0, 1.05, 1.2, 0.85]),
               TF.adjust_hue: torch.tensor([-0.1, -0.05, 0.0, 0.03, 0.1, 0.5])}
    n = len(x)
    for op, (theirs, f) in enumerate(factors.items()):  # in ColorJitter's order of the operations
        only_this = [other == op for other in range(4)]
        by_op = torch.zeros(n, 4, dtype=torch.float64)
        by_op[:, op] = f
        jitter = gpu_aug.jitter_stages(torch.ones(n, dtype=torch.bool), torch.arange(4).repeat(n, 1), by_op, only_this)
        expected = torch.stack([theirs(image, factor) for image, factor in zip(x, f.tolist())])
        torch.testing.assert_close(gpu_aug.color_jitter(x.clone(), jitter), expected, atol=2e-6, rtol=0,
                                   msg=theirs.__name__)
    torch.testing.assert_close(gpu_aug.grayscale(x), TF.rgb_to_grayscale(x), atol=0, rtol=0)


def test_colour_jitter_applies_each_images_own_order_and_skips_unselected_images():
    torch.manual_seed(1)
    x = torch.rand(4, 3, 8, 8)
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]])
    factors = torch.tensor([[1.3, 0.7, 1.1, 0.08], [0.7, 1.2, 0.9, -0.06], [1.1, 1.4, 0.8, 0.02], [0.9, 0.6, 1.2, -0.1]])
    apply = torch.tensor([True, True, True, False])
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for enabled in [(True,) * 4, (True, False, True, False)]:  # ColorJitter skips an operation without a range
        expected = x.clone()
        for i in range(3):
            for op_index in order[i].tolist():
                if enabled[op_index]:
                    expected[i] = ops[op_index](expected[i], factors[i, op_index].item())
        stages = gpu_aug.jitter_stages(apply, order, factors, enabled)
        torch.testing.assert_close(gpu_aug.color_jitter(x.clone(), stages), expected, atol=1e-5, rtol=0)
        assert torch.equal(gpu_aug.color_jitter(x.clone(), stages)[3], x[3])  # not selected: untouched


def test_colour_jitter_rotates_every_hue_in_one_stage_and_still_follows_each_images_order():
    generator = torch.Generator().manual_seed(2)
    n = 24
    x = torch.rand(n, 3, 6, 6, generator=generator)
    order = torch.rand(n, 4, generator=generator).argsort(dim=1)
    factors = torch.cat([0.6 + 0.8 * torch.rand(n, 3, generator=generator),
                         0.2 * torch.rand(n, 1, generator=generator) - 0.1], dim=1).double()
    apply = torch.rand(n, generator=generator) < 0.8
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    expected = x.clone()
    for i in apply.nonzero().flatten().tolist():
        for op_index in order[i].tolist():
            expected[i] = ops[op_index](expected[i], factors[i, op_index].item())
    jitter = gpu_aug.jitter_stages(apply, order, factors)
    torch.testing.assert_close(gpu_aug.color_jitter(x.clone(), jitter), expected, atol=1e-5, rtol=0)
    assert torch.equal(jitter["hue_rows"], apply.nonzero().flatten())  # every jittered image, in one stage
    assert len(jitter["blending"]) <= 7 and not jitter["blending"][jitter["hue_stage"]]


def test_to_device_moves_a_nest_of_tensors_in_one_buffer_keeping_values_dtypes_and_shapes():
    tree = ({"flags": torch.tensor([True, False, True]), "rows": torch.tensor([2, 0], dtype=torch.long),
             "none": torch.zeros(0, dtype=torch.long), "name": "kept"},
            [(1, torch.tensor([[0.1, 2.5e-9]], dtype=torch.float64), torch.tensor([1.3, -0.06]))])
    moved = gpu_aug.to_device(tree, torch.device("cpu"))
    assert moved[0]["name"] == "kept" and moved[1][0][0] == 1 and isinstance(moved[1][0], tuple)
    pairs = [(tree[0][k], moved[0][k]) for k in ("flags", "rows", "none")] + list(zip(tree[1][0][1:], moved[1][0][1:]))
    for before, after in pairs:
        assert after.dtype == before.dtype and after.shape == before.shape and torch.equal(after, before)
        assert after.data_ptr() != before.data_ptr() or before.numel() == 0  # copied, not the same storage


def test_gaussian_blur_equals_torchvisions_with_each_images_sigma():
    torch.manual_seed(2)
    x = torch.rand(3, 3, 20, 24)
    sigma = torch.tensor([0.1, 0.9, 2.0])
    expected = torch.stack([TF.gaussian_blur(image, [7, 7], [s, s]) for image, s in zip(x, sigma.tolist())])
    torch.testing.assert_close(gpu_aug.gaussian_blur(x, 7, sigma), expected, atol=2e-6, rtol=0)


def test_flip_greyscale_solarize_and_normalisation_equal_torchvision():
    torch.manual_seed(3)
    crops = torch.rand(4, 3, 10, 10)
    recipe = mdra.ViewAugmentation(size=(10, 10), scale=(1, 1), ratio=(1, 1), solarize_threshold=128,
                                   mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    chosen = torch.tensor([True, False, True, False])

    def normalise(x):
        return TF.normalize(x, recipe.mean, recipe.std)

    cases = {"flip": TF.hflip, "grey": lambda x: TF.rgb_to_grayscale(x, 3),
             "solarize": lambda x: TF.solarize(x, 128 / 255)}
    for name, op in cases.items():
        out = gpu_aug.augment_crops(crops, gpu_aug.augment_plan(no_op_params(4, **{name: chosen}), recipe), recipe)
        expected = torch.stack([normalise(op(c) if pick else c) for c, pick in zip(crops, chosen)])
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0, msg=name)


def test_a_whole_image_crop_at_its_own_size_is_the_image_for_stacked_and_listed_images():
    images = torch.randint(0, 256, (3, 3, 12, 20), dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 12.0]]).expand(2, 3, 4)
    for batch in (images, list(images)):
        crops = gpu_aug.resized_crops(batch, boxes, (12, 20))
        assert crops.shape == (6, 3, 12, 20) and crops.dtype == torch.float32
        torch.testing.assert_close(crops, images.float().repeat(2, 1, 1, 1), atol=0, rtol=0)


def test_upscaling_a_crop_is_bilinear_interpolation_and_views_come_view_major():
    images = torch.randint(0, 256, (2, 3, 9, 11), dtype=torch.uint8)
    boxes = torch.tensor([[[0.0, 0.0, 11.0, 9.0]] * 2, [[3.0, 2.0, 11.0, 7.0]] * 2])  # view 2: a crop
    crops = gpu_aug.resized_crops(list(images), boxes, (18, 22))
    expected = F.interpolate(images.float(), size=(18, 22), mode="bilinear", align_corners=False)
    torch.testing.assert_close(crops[:2], expected, atol=1e-3, rtol=0)  # view 1 of both images
    # Inside the crop (away from its border, where roi_align may read the pixels just outside it).
    inner = F.interpolate(images[:, :, 2:7, 3:11].float(), size=(18, 22), mode="bilinear", align_corners=False)
    torch.testing.assert_close(crops[2:, :, 2:-2, 2:-2], inner[:, :, 2:-2, 2:-2], atol=1e-3, rtol=0)


@pytest.mark.parametrize("pad_limit", [gpu_aug.PAD_LIMIT, 20])  # 20: two images are cropped alone
def test_listed_images_of_different_sizes_are_cropped_in_one_padded_batch_as_each_alone(pad_limit, monkeypatch):
    monkeypatch.setattr(gpu_aug, "PAD_LIMIT", pad_limit)
    generator = torch.Generator().manual_seed(0)
    sizes = [(12, 20), (7, 1), (1, 9), (30, 17), (5, 5), (23, 31)]  # one a pixel wide, one a pixel high
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]
    # Per image, view 1 a box touching the right and bottom borders (upscaled to 16 x 13 from most
    # sizes), view 2 a random box, sub-pixel, downscaled from the larger images and upscaled from the others.
    boxes = torch.zeros(2, len(sizes), 4, dtype=torch.float64)
    for i, (h, w) in enumerate(sizes):
        x1, y1 = torch.rand(2, generator=generator, dtype=torch.float64) * torch.tensor([w, h]) / 2
        boxes[0, i] = torch.tensor([x1, y1, w, h])
        x1, y1, x2, y2 = torch.rand(4, generator=generator, dtype=torch.float64) * torch.tensor([w, h, w, h]) / 2
        boxes[1, i] = torch.tensor([x1, y1, x2 + w / 2, y2 + h / 2])
    size = (16, 13)
    crops = gpu_aug.resized_crops(images, boxes.float(), size)
    # Reference: one roi_align call per unpadded image, as resized_crops made them before (float32).
    rois = torch.cat([torch.zeros_like(boxes[..., :1]), boxes], dim=2).float()
    expected = torch.stack([roi_align(image[None].float(), rois[:, i], size, sampling_ratio=-1, aligned=True)
                            for i, image in enumerate(images)], dim=1).flatten(0, 1)
    assert crops.shape == (2 * len(sizes), 3, *size) and crops.dtype == torch.float32
    torch.testing.assert_close(crops, expected, atol=1e-4, rtol=0)
    # The pad matters: crops that touch the right and bottom borders read past the last pixel.
    padded = gpu_aug.replicate_padded_batch(images)
    assert padded.shape == (len(sizes), 3, 31, 32) and padded.dtype == torch.float32
    for image, out in zip(images, padded):  # each image, its last row and column repeated to the batch's size
        h, w = image.shape[-2:]
        assert torch.equal(out, F.pad(image[None].float(), (0, 32 - w, 0, 31 - h), mode="replicate")[0])


def test_the_padded_batch_reads_images_in_any_memory_layout_and_views_dense_ones_without_a_copy():
    generator = torch.Generator().manual_seed(0)
    chw = torch.randint(0, 256, (3, 5, 9), dtype=torch.uint8, generator=generator)
    hwc = torch.randint(0, 256, (7, 4, 3), dtype=torch.uint8, generator=generator).permute(2, 0, 1)  # as decoders write
    sliced = torch.randint(0, 256, (3, 12, 8), dtype=torch.uint8, generator=generator)[:, ::2, 1:]  # not dense
    images = [chw, hwc, sliced]
    padded = gpu_aug.replicate_padded_batch(images)
    for image, out in zip(images, padded):
        assert torch.equal(out, F.pad(image.float(), (0, 10 - image.shape[-1], 0, 8 - image.shape[-2]), mode="replicate"))
    for image in (chw, hwc):
        flat, layout = gpu_aug.memory_order(image)
        assert flat.data_ptr() == image.data_ptr() and layout == [*image.shape[-2:], *image.stride()]


@pytest.mark.parametrize("height,width", [(375, 500), (60, 400)])  # ImageNet-like; so wide that few tries fit
def test_crop_boxes_follow_torchvisions_random_resized_crop(height, width):
    n = 6000
    recipe = mdra.ViewAugmentation(size=(224, 224), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    params = gpu_aug.sample_params(recipe, n, torch.Generator().manual_seed(0))
    boxes = gpu_aug.crop_boxes(params, torch.full((n,), height), torch.full((n,), width), recipe.ratio).numpy()
    ours = {"top": boxes[:, 1], "left": boxes[:, 0], "h": boxes[:, 3] - boxes[:, 1], "w": boxes[:, 2] - boxes[:, 0]}
    torch.manual_seed(0)
    image = torch.empty(1, height, width)
    theirs = np.array([T.RandomResizedCrop.get_params(image, recipe.scale, recipe.ratio) for _ in range(n)])
    theirs = dict(zip(("top", "left", "h", "w"), theirs.T))
    assert (ours["top"] >= 0).all() and (ours["top"] + ours["h"] <= height).all()
    assert (ours["left"] >= 0).all() and (ours["left"] + ours["w"] <= width).all()
    for key in ours:
        assert ks_distance(ours[key], theirs[key]) < ks_limit(n, n), key


@pytest.mark.parametrize("height,width,scale,ratio", [
    (60, 400, (0.9, 1.0), (3 / 4, 4 / 3)),   # too wide for any try: the widest allowed crop, centred
    (400, 60, (0.9, 1.0), (3 / 4, 4 / 3)),   # too tall: the tallest allowed crop, centred
    (90, 100, (1.1, 1.2), (3 / 4, 4 / 3)),   # more than the whole area never fits: the whole image
])
def test_when_no_try_fits_the_crop_is_torchvisions_central_fallback(height, width, scale, ratio):
    recipe = mdra.ViewAugmentation(size=(8, 8), scale=scale, ratio=ratio)
    params = gpu_aug.sample_params(recipe, 5, torch.Generator().manual_seed(0))
    boxes = gpu_aug.crop_boxes(params, torch.full((5,), height), torch.full((5,), width), ratio)
    top, left, h, w = T.RandomResizedCrop.get_params(torch.empty(1, height, width), scale, ratio)
    assert boxes.tolist() == [[left, top, left + w, top + h]] * 5


def test_parameter_rates_and_ranges_follow_the_cpu_transforms():
    n = 20000
    augmentations = mdra.view_augmentations(IMAGENET, 224, solarize=0.2)
    view1, view2 = (mdra.view_transform(augmentation) for augmentation in augmentations)  # the CPU path
    recipe = augmentations[1]
    params = gpu_aug.sample_params(recipe, n, torch.Generator().manual_seed(1))
    for name, p in (("flip", 0.5), ("jitter", 0.8), ("grey", 0.2), ("blur", 0.1), ("solarize", 0.2)):
        assert_rate(params[name].numpy(), p)
    torch.manual_seed(1)
    jitter = view2.transforms[2].transforms[0]
    theirs = [jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) for _ in range(4000)]
    their_factors = np.array([t[1:] for t in theirs])
    for i in range(4):
        assert ks_distance(params["jitter_factors"][:, i], their_factors[:, i]) < ks_limit(n, 4000)
    # Each of the 24 orders is equally likely, as with torch.randperm(4): chi-square over the orders,
    # with 23 degrees of freedom, is over 71 with probability 1e-6.
    orders = params["jitter_order"]
    assert (orders.sort(dim=1).values == torch.arange(4)).all()  # permutations
    counts = torch.bincount((orders * torch.tensor([64, 16, 4, 1])).sum(dim=1), minlength=256)
    counts = counts[counts > 0].double()
    expected = n / 24
    assert len(counts) == 24 and float(((counts - expected) ** 2 / expected).sum()) < 71
    blur = view1.transforms[4].transforms[0]
    their_sigma = [blur.get_params(*blur.sigma) for _ in range(4000)]
    assert ks_distance(params["sigma"], their_sigma) < ks_limit(n, 4000)


def test_views_match_the_cpu_path_in_per_image_mean_and_std():
    n, size = 600, 48  # 48 px: blur on, as at 224 px
    info = mdra.DataInfo("imagenet", 1000, [], size, mdra.IMAGENET_MEAN, mdra.IMAGENET_STD, False)
    augmentations = mdra.view_augmentations(info, size, solarize=0.3)
    view1, view2 = (mdra.view_transform(augmentation) for augmentation in augmentations)  # the CPU path
    pattern = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(4))
    image = (F.interpolate(pattern[None], size=(60, 80), mode="bicubic", align_corners=False)[0].clamp(0, 1) * 255)
    image = image.round().to(torch.uint8)
    torch.manual_seed(4)
    pil = TF.to_pil_image(image)
    cpu = [torch.stack([view(pil) for _ in range(n)]) for view in (view1, view2)]
    device_views = gpu_aug.DeviceTwoViews(*augmentations, seed=4, rank=0, world_size=1, device="cpu")
    ours = device_views(image.expand(n, 3, 60, 80), torch.zeros(n, dtype=torch.long), epoch=0, batch_index=0)
    for view, (theirs, mine) in enumerate(zip(cpu, ours[:2])):
        for statistic in (lambda v: v.mean(dim=(1, 2, 3)), lambda v: v.std(dim=(1, 2, 3)),
                          lambda v: v.mean(dim=(2, 3))[:, 0] - v.mean(dim=(2, 3))[:, 2]):
            assert ks_distance(statistic(mine), statistic(theirs)) < ks_limit(n, n), f"view {view + 1}"


def test_the_same_seed_epoch_and_batch_give_the_same_views_and_another_batch_others():
    views = gpu_aug.DeviceTwoViews(*mdra.view_augmentations(IMAGENET, 40), seed=7, rank=0, world_size=1, device="cpu")
    images = torch.randint(0, 256, (4, 3, 50, 60), dtype=torch.uint8)
    skipped = torch.zeros(4, dtype=torch.long)
    first, again, other = views(images, skipped, 2, 5), views(images, skipped, 2, 5), views(images, skipped, 2, 6)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert first[0].shape == first[1].shape == (4, 3, 40, 40) and first[0].dtype == torch.float32


def test_each_rank_makes_its_rows_of_the_single_process_views():
    augmentations = mdra.view_augmentations(IMAGENET, 40)
    images = list(torch.randint(0, 256, (6, 3, 50, 60), dtype=torch.uint8))  # sizes vary in real data
    images[1], images[4] = images[1][:, :45], images[4][:, :, :41]
    skipped = torch.zeros(6, dtype=torch.long)
    whole = gpu_aug.DeviceTwoViews(*augmentations, 3, 0, 1, "cpu")(images, skipped, 1, 9)
    for rank in range(2):
        part = gpu_aug.DeviceTwoViews(*augmentations, 3, rank, 2, "cpu")(images[3 * rank:3 * rank + 3], skipped[:3], 1, 9)
        for view in range(2):
            torch.testing.assert_close(part[view], whole[view][3 * rank:3 * rank + 3], atol=1e-6, rtol=0)


def test_decode_replaces_an_undecodable_file_by_the_next_image_and_counts_it():
    rng = np.random.default_rng(5)
    pictures = [Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)) for i in range(3)]
    items = [jpeg_bytes(pictures[0]), jpeg_bytes(pictures[1])[:60], torch.from_numpy(np.array(pictures[2])).permute(2, 0, 1)]
    decoded, failed = gpu_aug.decode(items, torch.device("cpu"))
    assert failed.tolist() == [0, 1, 0]
    assert [tuple(x.shape) for x in decoded] == [(3, 30, 40), (3, 32, 40), (3, 32, 40)]
    assert torch.equal(decoded[1], decoded[2])
    from_pil = torch.from_numpy(np.array(Image.open(io.BytesIO(items[0].numpy().tobytes())).convert("RGB")))
    assert (decoded[0].permute(1, 2, 0).int() - from_pil.int()).abs().max() <= 2  # two libjpeg builds
    with pytest.raises(RuntimeError, match="no image"):
        gpu_aug.decode([items[1]], torch.device("cpu"))


def test_a_jpeg_that_pil_reads_but_torchvision_refuses_is_decoded_as_the_cpu_path_reads_it():
    rng = np.random.default_rng(0)
    good = bytearray(jpeg_bytes(Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))).numpy().tobytes())
    for _ in range(100):  # a stray marker in the scan data: libjpeg warns, torchvision then refuses the file
        data = bytearray(good)
        at = int(rng.integers(len(data) // 2, len(data) - 4))
        data[at:at + 2] = bytes([0xFF, int(rng.integers(0xD0, 0xFF))])
        encoded = torch.frombuffer(data, dtype=torch.uint8)
        try:
            pil = TF.pil_to_tensor(Image.open(io.BytesIO(bytes(data))).convert("RGB"))
            torchvision.io.decode_jpeg(encoded)
        except (OSError, SyntaxError, ValueError):
            continue  # PIL cannot read it either
        except RuntimeError:
            break
    else:
        pytest.skip("no stray marker made a file that only PIL reads")
    decoded, failed = gpu_aug.decode([encoded], torch.device("cpu"))
    assert failed.tolist() == [0] and torch.equal(decoded[0], pil)


def test_the_loader_yields_jpeg_bytes_for_the_gpu_and_decodes_everything_else(tmp_path):
    (tmp_path / "a").mkdir()
    rng = np.random.default_rng(6)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "a" / "0.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8)).save(tmp_path / "a" / "1.png")
    files = mdra.ImageFiles(tmp_path)
    for_gpu = gpu_aug.UndecodedImages(files, jpeg_bytes=True)
    (jpeg, skipped, unread), (png, _, _) = for_gpu[0, 0], for_gpu[0, 1]
    assert jpeg.ndim == 1 and jpeg[:3].tolist() == gpu_aug.JPEG_SIGNATURE and skipped == 0 and unread == ""
    assert png.shape == (3, 20, 30) and png.dtype == torch.uint8  # grey PNG: RGB as in the CPU path
    images, skipped, unread = gpu_aug.collate_undecoded([for_gpu[0, 0], for_gpu[0, 1]])
    assert isinstance(images, list) and skipped.tolist() == [0, 0] and unread == ["", ""]
    on_cpu = gpu_aug.UndecodedImages(files, jpeg_bytes=False)
    images, _, _ = gpu_aug.collate_undecoded([on_cpu[0, 0], on_cpu[0, 1]])
    assert isinstance(images, torch.Tensor) and images.shape == (2, 3, 20, 30)


SMALL = mdra.DataInfo("small", 10, [], 12, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), True)


def in_memory(n, channels, size=12):
    """n random uint8 images in an mdra.ArrayImages: [n, H, W] if grey (channels 1), else [n, H, W, 3]."""
    shape = (n, size, size) if channels == 1 else (n, size, size, 3)
    return mdra.ArrayImages(np.random.default_rng(channels).integers(0, 256, shape, dtype=np.uint8), [0] * n, ["a"])


def micro_batches(images, batch, num_batches, held, rank=0, world_size=1):
    """--gpu-aug's (loader, sampler, device views) for images: held on the device (ResidentImages), or
    read by its loader path (UndecodedImages in a DataLoader)."""
    sampler = mdra.EpochSampler(len(images), batch, num_batches, world_size, rank, seed=3)
    if held:
        loader = gpu_aug.ResidentImages(images.as_tensor(), sampler, "cpu")
    else:
        loader = runtime.data_loader(gpu_aug.UndecodedImages(images, jpeg_bytes=False), batch // world_size, 0,
                                     torch.device("cpu"), sampler=sampler, collate_fn=gpu_aug.collate_undecoded)
    return loader, sampler, gpu_aug.DeviceTwoViews(*mdra.view_augmentations(SMALL, 12), 3, rank, world_size, "cpu")


def epoch_views(micro, epoch, start_batch=0):
    """An epoch's (v1, v2, skipped, unread) from micro-batch start_batch on, as mdra.train gets them."""
    loader, sampler, device_views = micro
    sampler.set_epoch(epoch, start_batch)
    return list(mdra.epoch_batches(loader, device_views, epoch, start_batch))


@pytest.mark.parametrize("channels", [1, 3])  # grey images stay one channel on the device
def test_images_held_in_memory_give_the_loader_paths_views_bit_for_bit(channels):
    images = in_memory(40, channels)
    held, read = micro_batches(images, 8, 5, held=True), micro_batches(images, 8, 5, held=False)
    assert held[0].images.shape == (40, channels, 12, 12) and held[0].images.dtype == torch.uint8
    for epoch, start_batch in [(0, 0), (1, 2)]:  # a resumed epoch skips its first micro-batches
        mine, theirs = epoch_views(held, epoch, start_batch), epoch_views(read, epoch, start_batch)
        assert len(mine) == len(theirs) == 5 - start_batch
        for (v1, v2, skipped, unread), (w1, w2, read_skipped, _) in zip(mine, theirs):
            assert v1.shape == (8, 3, 12, 12) and torch.equal(v1, w1) and torch.equal(v2, w2)
            assert torch.equal(skipped, read_skipped) and not skipped.any() and not unread


def test_two_ranks_holding_the_images_make_the_rows_of_the_single_process_views():
    images = in_memory(32, 3)
    whole = epoch_views(micro_batches(images, 8, 4, held=True), 1, 1)
    ranks = [epoch_views(micro_batches(images, 8, 4, held=True, rank=rank, world_size=2), 1, 1) for rank in range(2)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == 3
    for b, (v1, v2, _, _) in enumerate(whole):
        for view, expected in enumerate((v1, v2)):
            assert torch.equal(torch.cat([ranks[0][b][view], ranks[1][b][view]]), expected), (b, view)


def host_ops_per_micro_batch(batch, held):
    """The aten operations (as benchmarks/bench_train.host_ops counts them) that the second micro-batch
    of an epoch dispatches, from its images to its views; the first also draws the epoch's order."""
    loader, sampler, device_views = micro_batches(in_memory(4 * batch, 1), batch, 4, held)
    sampler.set_epoch(0)
    batches = iter(loader)
    next(batches)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        images, skipped, _ = next(batches)
        device_views(images, skipped, 0, 1)
    return sum(event.count for event in profiler.key_averages() if event.key.startswith("aten::"))


def test_host_operations_per_micro_batch_held_in_memory_do_not_grow_with_the_batch():
    assert host_ops_per_micro_batch(64, held=True) == host_ops_per_micro_batch(256, held=True)
    # The loader path, its collate included, dispatches a few per image: what holding them saves.
    assert host_ops_per_micro_batch(256, held=False) > host_ops_per_micro_batch(64, held=False) + 3 * 192


def test_gpu_aug_is_off_by_default_and_no_gpu_aug_names_the_cpu_loader():
    parse = mdra.get_parser().parse_args
    assert parse([]).gpu_aug is False and parse(["--no-gpu-aug"]).gpu_aug is False and parse(["--gpu-aug"]).gpu_aug
    assert "gpu_aug" not in mdra.RESUME_MAY_CHANGE  # its views differ from the CPU loader's: a resumed run keeps it


TINY = ["--img-size", "16", "--arch", "resnet18", "--batch-size", "16", "--queue-size", "32", "--workers", "0",
        "--log-every", "1", "--device", "cpu", "--gpu-aug"]


def test_mdra_gpu_aug_holds_synthetic_data_on_the_device_and_resumes_exactly(tmp_path, capsys):
    synthetic = ["--data", "synthetic", "--synthetic-size", "32", "--epochs", "1", *TINY]
    straight = mdra.main([*synthetic, "--out-dir", str(tmp_path / "straight")])
    held = "32 images held on cpu as uint8 (0.0 MB); views made there in batches, no loader workers"
    assert held in capsys.readouterr().out
    mdra.main([*synthetic, "--out-dir", str(tmp_path / "resumed"), "--max-steps", "1"])
    resumed = mdra.main([*synthetic, "--out-dir", str(tmp_path / "resumed")])  # from the middle of the epoch
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (straight, resumed))
    assert a["step"] == b["step"] == 2 and a["args"]["gpu_aug"]
    for key in a["online"]:
        assert torch.equal(a["online"][key], b["online"][key]), key
    assert torch.equal(a["queue"], b["queue"])


def test_the_offline_encoders_weak_views_come_after_the_two_views_cropped_and_flipped_but_not_recoloured(
        tmp_path):
    # --offline-view weak with --gpu-aug: the two views are those made without the weak ones (drawn after
    # them), and a one-colour image keeps its colour in every weak view, where most strong ones recolour it.
    augmentations = mdra.view_augmentations(SMALL, 12, solarize=0.5)
    weak = mdra.weak_view(augmentations[0])
    colours = torch.randint(0, 256, (8, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    images, skipped = colours[:, :, None, None].expand(8, 3, 20, 20).contiguous(), torch.zeros(8, dtype=torch.long)
    alone = gpu_aug.DeviceTwoViews(*augmentations, 3, 0, 1, "cpu")(images, skipped, 2, 5)
    views = gpu_aug.DeviceTwoViews(*augmentations, 3, 0, 1, "cpu", offline_views=(weak, weak))(images, skipped, 2, 5)
    assert len(alone) == 3 and len(views) == 5 and views[4] is skipped
    torch.testing.assert_close(views[0], alone[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(views[1], alone[1], rtol=0, atol=1e-6)
    mean, std = torch.tensor(SMALL.mean)[:, None, None], torch.tensor(SMALL.std)[:, None, None]
    expected = ((colours[:, :, None, None] / 255 - mean) / std).expand(8, 3, 12, 12)
    for w in views[2:4]:
        torch.testing.assert_close(w, expected, rtol=0, atol=1e-5)
    recoloured = ((views[0] - expected).abs().flatten(1).amax(1) > 1e-3).sum()
    assert recoloured >= 4  # colour jitter p 0.8, greyscale p 0.2
    # And a run of mdra.py with them, its images held on the device.
    ckpt = torch.load(mdra.main(["--data", "synthetic", "--synthetic-size", "32", "--max-steps", "1", *TINY,
                                 "--offline-view", "weak", "--out-dir", str(tmp_path)]), weights_only=True)
    assert ckpt["step"] == 1 and ckpt["args"]["offline_view"] == "weak" and torch.isfinite(ckpt["queue"]).all()


def test_mdra_gpu_aug_trains_on_an_image_folder_of_jpegs_with_a_worker(tmp_path, capsys):
    rng = np.random.default_rng(7)
    for i in range(16):
        (tmp_path / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        size = (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / "data" / f"c{i % 2}" / f"{i}.jpg")
    args = ["--data", str(tmp_path / "data"), "--epochs", "1", "--accum-steps", "1", *TINY, "--workers", "1"]
    ckpt = torch.load(mdra.main([*args, "--out-dir", str(tmp_path / "run")]), map_location="cpu", weights_only=True)
    assert ckpt["step"] == 1 and torch.isfinite(ckpt["queue"]).all()
    assert "held on" not in capsys.readouterr().out  # files are read by the loader, not held


def test_mdra_gpu_aug_takes_a_step_on_fashion_mnist_held_as_one_grey_channel(tmp_path, capsys):
    if not Path(mdra.FASHION_MNIST_SYSTEM_DIR).is_dir():
        pytest.skip("the dataset-fashion-mnist package is not installed")
    ckpt = torch.load(mdra.main(["--data", "fashion-mnist", "--arch", "resnet18", "--batch-size", "16", "--queue-size",
                                 "64", "--max-steps", "1", "--workers", "0", "--device", "cpu", "--gpu-aug",
                                 "--out-dir", str(tmp_path)]), map_location="cpu", weights_only=True)
    assert ckpt["step"] == 1 and ckpt["args"]["img_size"] == 28 and torch.isfinite(ckpt["queue"]).all()
    assert "60000 images held on cpu as uint8 (47.0 MB)" in capsys.readouterr().out


def test_the_prefetcher_yields_exactly_the_views_made_in_the_loop_and_stops_cleanly():
    views = gpu_aug.DeviceTwoViews(*mdra.view_augmentations(IMAGENET, 24), seed=2, rank=0, world_size=1, device="cpu")
    batches = [(torch.randint(0, 256, (3, 3, 30, 40), dtype=torch.uint8), torch.tensor([0, 1, 0]), ["", "a: why", ""])
               for _ in range(5)]
    prefetched = list(views.prefetch(iter(batches), 3, 7))
    assert len(prefetched) == 5
    for k, (images, skipped, unread) in enumerate(batches):  # global micro-batch 7 + k of epoch 3
        expected = views(images, skipped, 3, 7 + k)
        for mine, theirs in zip(prefetched[k], expected):
            assert torch.equal(mine, theirs)
        assert prefetched[k][3] is unread
    # Closed inside the epoch (a run that ends there), the thread stops although batches are left.
    prefetcher = views.prefetch(iter(batches * 10), 0, 0)
    next(prefetcher)
    prefetcher.close()
    assert not prefetcher.thread.is_alive()


def test_the_prefetch_thread_takes_no_batch_and_makes_no_views_while_a_capture_holds_the_device_lock():
    # A CUDA graph's capture allows no other device work in the process: the thread waits, then goes on.
    done = []

    class Views:  # DeviceTwoViews's call, recording when it runs
        device = torch.device("cpu")

        def __call__(self, images, skipped, epoch, index):
            done.append(f"views {index}")
            return images, images, skipped

    def batches():  # a loader whose next batch is gathered on the device (ResidentImages)
        for k in range(3):
            done.append(f"batch {k}")
            yield torch.full((1,), k), torch.zeros(1, dtype=torch.long), ()

    with runtime.DEVICE_WORK_LOCK:
        prefetcher = gpu_aug.Prefetcher(Views(), batches(), 0, 5)
        time.sleep(0.3)
        assert done == [] and prefetcher.thread.is_alive()
    assert [v1.item() for v1, _, _, _ in prefetcher] == [0, 1, 2]
    assert done == ["batch 0", "views 5", "batch 1", "views 6", "batch 2", "views 7"]
    prefetcher.close()


def test_an_error_in_the_prefetch_thread_is_raised_in_the_training_loop():
    views = gpu_aug.DeviceTwoViews(*mdra.view_augmentations(IMAGENET, 24), seed=2, rank=0, world_size=1, device="cpu")
    not_a_jpeg = [torch.tensor([1, 2, 3], dtype=torch.uint8)]  # alone in its batch: nothing to replace it by
    prefetcher = views.prefetch(iter([(not_a_jpeg, torch.zeros(1, dtype=torch.long), [""])]), 0, 0)
    with pytest.raises(RuntimeError, match="no image of the batch can be decoded"):
        next(prefetcher)


def test_the_prefetch_thread_names_the_cuda_device_of_the_loop(monkeypatch):
    # torch.cuda.set_device in the thread refuses a device without an index, which a single process
    # on "cuda" has: the index is the loop's current device.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert gpu_aug.with_index("cuda") == torch.device("cuda", 3)
    assert gpu_aug.with_index(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert gpu_aug.with_index("cpu") == torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# finetune.py --gpu-aug: the training crops and the evaluation images of a data set held on the device
# ------------------------------------------------------------------------------------------------

def held_crops(images, labels, batch, num_batches, rank=0, world_size=1, size=12):
    import finetune
    sampler = mdra.EpochSampler(len(images), batch, num_batches, world_size, rank, seed=5)
    recipe = finetune.train_augmentation(SMALL, size)
    return gpu_aug.HeldCrops(images, labels, recipe, sampler, 5, rank, world_size, "cpu"), sampler


def test_held_crops_match_finetunes_cpu_transform_in_per_image_mean_and_std():
    import finetune
    n = 600
    pattern = torch.rand(1, 4, 5, generator=torch.Generator().manual_seed(6))
    image = (F.interpolate(pattern[None], size=(28, 28), mode="bicubic", align_corners=False)[0].clamp(0, 1) * 255)
    image = image.round().to(torch.uint8)  # one grey image, as Fashion-MNIST's
    torch.manual_seed(6)
    pil = TF.to_pil_image(image).convert("RGB")
    cpu = torch.stack([finetune.train_transform(SMALL, 20)(pil) for _ in range(n)]).float()
    crops = gpu_aug.HeldCrops(image.expand(n, 1, 28, 28), [0] * n, finetune.train_augmentation(SMALL, 20),
                              mdra.EpochSampler(n, n, 1, 1, 0, seed=6), 6, 0, 1, "cpu")
    mine, labels, skipped, unread = next(iter(crops))
    assert mine.shape == cpu.shape == (n, 3, 20, 20) and mine.dtype == torch.float32 and mine.is_contiguous()
    assert torch.equal(mine[:, 0], mine[:, 2]) and not skipped.any() and not unread
    assert 0 <= mine.min() and mine.max() <= 255 + 1e-3  # the 0-255 scale, to float rounding
    left_minus_right = lambda v: v[..., :10].mean(dim=(1, 2, 3)) - v[..., 10:].mean(dim=(1, 2, 3))  # the flip
    for statistic in (lambda v: v.mean(dim=(1, 2, 3)), lambda v: v.std(dim=(1, 2, 3)), left_minus_right):
        assert ks_distance(statistic(mine), statistic(cpu)) < ks_limit(n, n)


def test_held_crops_are_a_function_of_seed_epoch_and_batch_and_each_rank_makes_its_rows():
    images = torch.randint(0, 256, (16, 1, 14, 14), dtype=torch.uint8)
    labels = list(range(16))
    whole, sampler = held_crops(images, labels, 8, 2)
    sampler.set_epoch(1)
    first = list(whole)
    sampler.set_epoch(1, start_batch=1)  # a resumed epoch: its second micro-batch is the same
    again = list(whole)
    assert len(first) == 2 and len(again) == 1 and torch.equal(first[1][0], again[0][0])
    sampler.set_epoch(2)
    assert not torch.equal(next(iter(whole))[0], first[0][0])
    order = torch.randperm(16, generator=torch.Generator().manual_seed(5 + 1))  # the sampler's epoch 1
    assert first[0][1].tolist() == order[:8].tolist()  # each crop with its image's label
    for b, (crops, batch_labels, _, _) in enumerate(first):
        parts = []
        for rank in range(2):
            ranked, rank_sampler = held_crops(images, labels, 8, 2, rank=rank, world_size=2)
            rank_sampler.set_epoch(1)
            parts.append(list(ranked)[b])
        assert torch.equal(torch.cat([p[0] for p in parts]), crops)
        assert torch.equal(torch.cat([p[1] for p in parts]), batch_labels)


def test_held_evaluation_images_are_the_loaders_centre_crops_bit_for_bit():
    import finetune
    images = in_memory(10, 1, size=12)
    images.targets = list(range(10))
    loader = runtime.data_loader(mdra.CentreCrops(images, finetune.eval_transform(12, 12)), 4, 0, torch.device("cpu"))
    held = gpu_aug.HeldImages(*finetune.held(images, range(10)), 4, "cpu")
    pairs = list(zip(loader, held))
    assert len(pairs) == 3
    for (theirs, their_labels, _), (mine, labels, unread) in zip(loader, held):
        assert mine.dtype == torch.uint8 and torch.equal(mine, theirs) and torch.equal(labels, their_labels)
        assert not unread


def test_the_held_images_of_a_subset_are_the_pixels_and_labels_its_items_give():
    import finetune
    for images in (in_memory(12, 1, size=6), in_memory(12, 3, size=6), mdra.SyntheticImages(12, 6)):
        images.targets = [(3 * i) % 10 for i in range(12)]
        subset = torch.utils.data.Subset(torch.utils.data.Subset(images, [11, 3, 5, 7, 0, 2]), [4, 1, 2])
        tensor, labels = finetune.held(subset, [2, 0])  # images 5 and 0
        channels = 1 if isinstance(images, mdra.ArrayImages) and images.images.ndim == 3 else 3
        assert tensor.dtype == torch.uint8 and tensor.shape == (2, channels, 6, 6)
        expected = torch.stack([TF.pil_to_tensor(subset[i][0]) for i in (2, 0)])  # the RGB images the loader reads
        assert torch.equal(tensor.expand(-1, 3, -1, -1), expected)
        assert labels == [subset[i][1] for i in (2, 0)] == [images.targets[5], images.targets[0]]
        assert torch.equal(images.as_tensor()[[5, 0]], tensor)  # the rows of all of them
