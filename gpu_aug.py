"""The two-view augmentation on batched tensors, on the GPU (mdra.py --gpu-aug).

At 224 px the CPU loader, which decodes every JPEG and makes two augmented views of it with PIL, is
slower than a GPU training step. With --gpu-aug the loader workers only read the files; JPEGs are
decoded on the GPU in one batched call, and both views of the whole micro-batch are made as one batch
of crops: random resized crop, horizontal flip, colour jitter in a random order, greyscale, Gaussian
blur, solarize and normalisation, every crop with its own random parameters (the two views differ only
in how those are drawn).

Both paths apply the same definition of each view's augmentation (mdra.view_augmentations): the CPU
path as torchvision transforms (mdra.view_transform), this module by reading its fields, and every
parameter is drawn from the same distribution as torchvision's get_params draws it there;
tests/test_gpu_aug.py checks the distributions against the CPU path made from the same definitions,
and each colour operation against torchvision's. Two differences are deliberate: crops are resized
bilinearly with area averaging (roi_align) rather than with PIL's bicubic filter, and intermediate
results are not rounded to 8 bits. A third comes with the GPU decoder: its pixels may differ from
PIL's in the last bits, and in how it upsamples the colour planes of a JPEG that subsamples them.

An in-memory data set (mdra.ArrayImages, mdra.SyntheticImages) has nothing to decode, so no loader
either: it is copied to the device once as uint8 (grey images as one channel), and each micro-batch is
gathered there with one indexing operation, the images mdra.EpochSampler names (ResidentImages); its
views are bit for bit those made of the same images from the loader.

finetune.py --gpu-aug holds its labelled images the same way and makes their training crops and flips
in batches (HeldCrops), and its evaluation images where their centre crop is the whole image (HeldImages).

The parameters of a micro-batch come from a generator seeded by (seed, epoch, batch index) and are
drawn for the global micro-batch, of which each rank takes its rows: the views depend neither on the
number of ranks or workers nor on whether the run was resumed. The same code runs on CPU tensors.

Making a micro-batch's views costs the GPU little but the host a few hundred kernel launches, so the
views of the next micro-batches are made ahead by a background thread on a side stream (Prefetcher),
and each micro-batch's parameters reach the device in one copy (to_device).
"""
import contextlib
import functools
import io
import itertools
import queue
import threading
from dataclasses import replace

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode
from torchvision.ops import roi_align
from torchvision.transforms.functional import pil_to_tensor

import runtime

JPEG_SIGNATURE = [0xFF, 0xD8, 0xFF]


# ------------------------------------------------------------------------------------------------
# Loader side: the workers read files; JPEGs stay encoded for the GPU decoder. In-memory data sets
# are held on the device instead, with no loader (ResidentImages).
# ------------------------------------------------------------------------------------------------

class UndecodedImages(Dataset):
    """Pretraining samples keyed by (epoch, index), as mdra.TwoViews, but not augmented: yields
    (uint8 tensor, number of unreadable files skipped, their "path: why" lines) as mdra.TwoViews.

    With jpeg_bytes, a JPEG file of an ImageFolder is yielded as its bytes (1-d) for the GPU decoder.
    Everything else (other formats, in-memory data sets, any file when the GPU cannot decode) is
    decoded here as the CPU path decodes it, into [3, H, W].
    """

    def __init__(self, images, jpeg_bytes):
        self.images = images
        self.paths = getattr(images, "paths", None) if jpeg_bytes else None  # mdra.ImageFiles has paths

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        _, index = key
        if self.paths is not None:
            try:
                with open(self.paths[index], "rb") as f:
                    data = f.read()
                if list(data[:3]) == JPEG_SIGNATURE:
                    return torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, ""
            except OSError:  # unreadable: read_image below skips it as the CPU path does
                pass
        image, _, skipped = runtime.read_image(self.images, index)
        return pil_to_tensor(image), len(skipped), "\n".join(skipped)


def collate_undecoded(samples):
    """A list of uint8 tensors, or one [B, 3, H, W] tensor when all are decoded images of one size
    (an in-memory data set), the skipped counts and the skipped files' lines."""
    images, skipped, unread = zip(*samples)
    if all(x.ndim == 3 for x in images) and len({x.shape for x in images}) == 1:
        images = torch.stack(images)
    else:
        images = list(images)
    return images, torch.tensor(skipped), list(unread)


class ResidentImages:
    """An in-memory data set held on the device as uint8, in place of the loader: each micro-batch is
    gathered there by one indexing operation, as a collate_undecoded batch of the same images, of
    which DeviceTwoViews makes exactly the views it makes of the loader's. Nothing is copied per
    micro-batch and no worker runs, so the host's work per micro-batch does not grow with its size.

    images: uint8 [n, C, H, W] on any device, C = 1 for grey images (expanded to their three equal RGB
    channels when gathered) or 3. sampler: an mdra.EpochSampler, whose batches() are the images of this
    rank's micro-batches for the epoch it was last set to, as for a DataLoader.
    Yields (uint8 [b, 3, H, W] on device, [b] skipped counts, no unread lines): nothing in memory is unreadable.
    """

    def __init__(self, images, sampler, device):
        self.images = images.to(device)
        if self.images.device.type == "cuda":  # the copy is done before the prefetch thread's own stream reads it
            torch.cuda.synchronize(self.images.device)
        self.sampler = sampler
        self.no_skips = torch.zeros(sampler.local_batch, dtype=torch.long)

    def __iter__(self):
        for indices in self.sampler.batches(self.images.device):
            yield self.images.index_select(0, indices).expand(-1, 3, -1, -1), self.no_skips, ()

    def summary(self):
        """Where the images are held, for the run's log."""
        megabytes = self.images.numel() * self.images.element_size() / 1e6
        return (f"{len(self.images)} images held on {self.images.device} as uint8 ({megabytes:.1f} MB); "
                "views made there in batches, no loader workers")


def decode(images, device):
    """Decode on the device: 1-d tensors are encoded JPEGs, 3-d ones decoded images.

    Returns (list of uint8 [3, H, W] on device, [B] count of undecodable files). A file that cannot be
    decoded is replaced by the next decodable image of the batch, as runtime.read_image replaces an
    unreadable file by the next readable one.
    """
    decoded = [x.to(device, non_blocking=True) if x.ndim == 3 else None for x in images]
    encoded = [i for i, x in enumerate(images) if x.ndim == 1]
    if encoded:
        try:
            batch = decode_jpegs([images[i] for i in encoded], device)
        except RuntimeError:  # one bad file fails the batched call: decode one by one to find it
            batch = [_decode_one(images[i], device) for i in encoded]
        for i, x in zip(encoded, batch):
            decoded[i] = x
    readable = [i for i, x in enumerate(decoded) if x is not None]
    if not readable:
        raise RuntimeError("no image of the batch can be decoded")
    failed = torch.tensor([x is None for x in decoded], dtype=torch.long)
    for i in failed.nonzero().flatten().tolist():
        decoded[i] = decoded[next((j for j in readable if j > i), readable[0])]
    return decoded, failed


def decode_jpegs(data, device):
    """torchvision's batched decoder, as RGB. On CUDA it writes its outputs from a stream of its own
    without waiting for the current one (nor does the hardware decoder honour stream order), so
    outputs allocated on the training stream could land in memory that queued kernels still read
    (pytorch/vision#9606). They are allocated on a side stream instead, whose blocks the allocator
    hands out again only once the training stream is done with them (record_stream)."""
    if device.type != "cuda":
        return torchvision.io.decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    current, side = torch.cuda.current_stream(device), side_stream(with_index(device), "decode")
    with torch.cuda.stream(side):
        images = torchvision.io.decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    current.wait_stream(side)
    for image in images:
        image.record_stream(current)
    return images


@functools.lru_cache
def side_stream(device, purpose):
    """This module's stream for purpose ("decode", "prefetch") on device, one for the whole process (decoded
    images reuse one pool of cached blocks), and never another's: PyTorch hands out pooled streams
    round-robin, 32 per priority (c10/cuda/CUDAStream.h), so a stream drawn anew each epoch, or from the
    default-priority pool that torch.cuda.Stream() draws from (the captured step's, torchvision's decoder's),
    would sooner or later be one of the others, and the ordering that the streams keep apart would be lost.
    These two are the only ones drawn from the high-priority pool."""
    return torch.cuda.Stream(device, priority=-1)


def _decode_one(data, device):
    """One JPEG on the device, else as the CPU path reads it, with PIL, which takes files torchvision's
    decoders refuse (e.g. a scan with a stray marker, which libjpeg only warns about); None if PIL
    cannot read it either."""
    try:
        return decode_jpegs([data], device)[0]
    except RuntimeError:
        pass
    try:
        with Image.open(io.BytesIO(data.numpy())) as image:
            return pil_to_tensor(runtime.rgb(image)).to(device)
    except runtime.READ_ERRORS:
        return None


# ------------------------------------------------------------------------------------------------
# The recipe and its random parameters. A recipe is one view's augmentation, an mdra.ViewAugmentation:
# this module reads its fields (sizes, probabilities, ranges, the normalisation) and nothing else.
# ------------------------------------------------------------------------------------------------

def shared_recipe(recipes):
    """The recipe by which the crops of both views are augmented as one batch. The views may differ in
    whatever is drawn per image (probabilities, ranges), not in what the batch's operations are: the
    crop size and fallback aspect ratios, which jitter operations exist, the blur kernel and solarize
    threshold of the views that use them, and the normalisation."""
    def operations(recipe):
        return recipe.size, recipe.ratio, [r is None for r in recipe.jitter], recipe.mean, recipe.std

    kernels = {recipe.blur_kernel for recipe in recipes if recipe.blur_p > 0}
    thresholds = {recipe.solarize_threshold for recipe in recipes if recipe.solarize_p > 0}
    if len(kernels) > 1 or len(thresholds) > 1 or any(operations(r) != operations(recipes[0]) for r in recipes):
        raise ValueError("gpu_aug augments both views as one batch: they may differ in probabilities and ranges, "
                         "not in crop size, aspect ratios, jitter operations, blur kernel, solarize threshold "
                         "or normalisation")
    return replace(recipes[0], blur_kernel=max(kernels, default=1),
                   solarize_threshold=max(thresholds, default=recipes[0].solarize_threshold))


def sample_params(recipe, n, generator):
    """The random parameters of n images of one view, drawn from generator in a fixed order.

    None depends on the image size (the crop keeps raw uniforms; crop_boxes turns them into a box),
    so every rank can draw them for the whole global micro-batch and take its own rows.
    """
    def uniform(low_high, *shape):
        low, high = low_high
        return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)

    def coin(p):
        return torch.rand(n, generator=generator, dtype=torch.float64) < p

    log_ratio = torch.tensor(recipe.ratio, dtype=torch.float64).log()
    return {
        # RandomResizedCrop.get_params: 10 tries of (area fraction, log aspect ratio), then a position.
        "area": uniform(recipe.scale, n, 10),
        "log_ratio": uniform(log_ratio.tolist(), n, 10),
        "position": uniform((0.0, 1.0), n, 2),
        "flip": coin(recipe.flip_p),
        "jitter": coin(recipe.jitter_p),
        # ColorJitter.get_params: the order is torch.randperm(4); sorting uniforms is equally uniform.
        "jitter_order": torch.rand(n, 4, generator=generator).argsort(dim=1),
        "jitter_factors": torch.stack([uniform(r or (0.0, 0.0), n) for r in recipe.jitter], dim=1),
        "grey": coin(recipe.grey_p),
        "blur": coin(recipe.blur_p),
        "sigma": uniform(recipe.blur_sigma, n),
        "solarize": coin(recipe.solarize_p),
    }


def crop_boxes(params, heights, widths, ratio):
    """RandomResizedCrop.get_params for a batch: the first of the 10 tries whose crop fits in the
    image, else the central crop of the nearest allowed aspect ratio (or the whole image).

    heights, widths: [n] image sizes. Returns [n, 4] float64 boxes (x1, y1, x2, y2) in pixel edges,
    whole pixels as torchvision crops them.
    """
    H, W = heights.double(), widths.double()
    target_area = (H * W)[:, None] * params["area"]
    aspect = params["log_ratio"].exp()
    w_try = (target_area * aspect).sqrt().round()  # torch.round and Python's round both round half to even
    h_try = (target_area / aspect).sqrt().round()
    fits = (w_try > 0) & (w_try <= W[:, None]) & (h_try > 0) & (h_try <= H[:, None])
    first = fits.int().argmax(dim=1, keepdim=True)  # the index of the first fitting try
    found = fits.any(dim=1)

    in_ratio = W / H
    low, high = min(ratio), max(ratio)
    w = torch.where(found, w_try.gather(1, first)[:, 0], torch.where(in_ratio > high, (H * high).round(), W))
    h = torch.where(found, h_try.gather(1, first)[:, 0], torch.where(in_ratio < low, (W / low).round(), H))
    # A found crop lies uniformly among the integer positions that fit (torch.randint); else centred.
    top = torch.where(found, (params["position"][:, 0] * (H - h + 1)).floor(), ((H - h) / 2).floor())
    left = torch.where(found, (params["position"][:, 1] * (W - w + 1)).floor(), ((W - w) / 2).floor())
    return torch.stack([left, top, left + w, top + h], dim=1)


# ------------------------------------------------------------------------------------------------
# The operations, on float images [N, 3, H, W] in [0, 1] with one parameter per image
# ------------------------------------------------------------------------------------------------

def replicate_padded_batch(images):
    """A list of N [C, H_i, W_i] images as one float32 [N, C, Hmax + 1, Wmax + 1] batch for roi_align.

    Image i lies at the top-left corner, its last row and column repeated below and to the right of it
    up to the batch's size (at least once): roi_align's bilinear interpolation, which for a sample
    point past the last row or column of its map uses that row or column, then blends a sample point
    between image i's last row (column) and the next one exactly as on image i alone. Its sample
    points stay within half a pixel of a box inside the image, so they read nothing further out.

    The images' memory is concatenated as it lies (decoders write [C, H, W] or [H, W, C]) and the
    batch is read from it at indices clamped to each image's last row and column: about fifteen
    launches for the whole batch (a pad per image cost two each), with no host and device
    synchronisation. The batch is as large as the largest image in each direction (resized_crops keeps
    images over PAD_LIMIT out of it): about 64 x 3 x 500 x 500 floats (190 MB) for 64 ImageNet images,
    and as many 32-bit indices while it is read.
    """
    channels = images[0].shape[0]
    height = max(image.shape[-2] for image in images) + 1
    width = max(image.shape[-1] for image in images) + 1
    flats, layouts = zip(*(memory_order(image) for image in images))
    numels = torch.tensor([flat.numel() for flat in flats])
    index_dtype = torch.int32 if numels.sum() < 2**31 else torch.int64  # halves the indices' memory
    # Per image: height, width, start in the concatenation, and the strides of channel, row and column.
    layouts = torch.cat([torch.tensor(layouts), (numels.cumsum(0) - numels)[:, None]], dim=1).to(index_dtype)
    h, w, stride_c, stride_y, stride_x, start = to_device(layouts.T[..., None, None, None], images[0].device)
    flat = torch.cat(flats).float()
    rows, cols, channel = (torch.arange(n, device=flat.device, dtype=index_dtype) for n in (height, width, channels))
    # Pixel (c, y, x) of image i: start_i + c stride_c + min(y, h_i - 1) stride_y + min(x, w_i - 1) stride_x.
    row_starts = start + channel[:, None, None] * stride_c + torch.minimum(rows[:, None], h - 1) * stride_y
    index = row_starts + torch.minimum(cols, w - 1) * stride_x                         # [N, C, H, W]
    return flat.index_select(0, index.view(-1)).view(index.shape)  # index_select reads 32-bit indices as they are


def memory_order(image):
    """A [C, H, W] image as a 1-d view of its memory, without a copy when it is laid out [C, H, W] or,
    as decoders write it, [H, W, C]; and [H, W, stride of C, of H, of W] to read it back."""
    c, h, w = image.shape
    if image.is_contiguous():
        return image.view(-1), [h, w, h * w, w, 1]
    channels_last = image.permute(1, 2, 0)
    if channels_last.is_contiguous():
        return channels_last.view(-1), [h, w, 1, w * c, c]
    return image.reshape(-1), [h, w, h * w, w, 1]  # any other layout is copied


PAD_LIMIT = 640  # images larger than this on either side are not padded into the shared batch


def resized_crops(images, boxes, size):
    """Crop every box and resize it to size, bilinearly with area averaging (roi_align samples each
    output pixel ceil(box / size) times per axis, which keeps downscaling from aliasing).

    images: uint8 [N, C, H, W], or a list of N uint8 [C, H_i, W_i] of different sizes, which are
    padded into one batch (replicate_padded_batch) so that a single roi_align call serves them all, as
    for a tensor: one call per image cost ~70 us of host time each on the GPU. The few images larger
    than PAD_LIMIT on a side (a data set's outliers) get a call of their own instead, which bounds
    the padded batch at 64 x 3 x 641 x 641 floats (315 MB) for a micro-batch of 64.
    boxes: [V, N, 4] (x1, y1, x2, y2), one box per view and image, inside its image, on the images'
    device or the CPU.
    Returns float [V * N, C, *size] on the 0-255 scale, view-major.
    """
    if isinstance(images, torch.Tensor):
        return roi_crops(images.float(), boxes, size)
    large = [i for i, image in enumerate(images) if max(image.shape[-2:]) > PAD_LIMIT]
    # A large image is padded as a 1-pixel stand-in, whose crops are then replaced by its own: rows
    # are chosen by Python integers only, as an index tensor would be a copy that waits for the device.
    padded = replicate_padded_batch([image[:, :1, :1] if i in large else image for i, image in enumerate(images)])
    crops = roi_crops(padded, boxes, size).unflatten(0, boxes.shape[:2])
    for i in large:
        crops[:, i] = roi_crops(images[i][None].float(), boxes[:, i:i + 1], size)
    return crops.flatten(0, 1)


def roi_crops(batch, boxes, size):
    """roi_align of float images [N, C, H, W] at boxes [V, N, 4], view-major: [V * N, C, *size]."""
    views, n = boxes.shape[:2]
    index = torch.arange(n, device=boxes.device, dtype=boxes.dtype).repeat(views)[:, None]
    rois = torch.cat([index, boxes.flatten(0, 1)], dim=1).to(batch.device, torch.float32)
    return roi_align(batch, rois, size, sampling_ratio=-1, aligned=True)


def per_image(values, x):
    """A [N] parameter (on x's device or the CPU) as [N, 1, 1, 1] in x's dtype and device, to broadcast over images."""
    return values.to(x.device, x.dtype, non_blocking=True).view(-1, 1, 1, 1)


def grayscale(x):
    """ITU-R 601-2 luma with torchvision's weights for tensors: [N, 1, H, W] (the same sum, in the
    same order, in two launches instead of five)."""
    return (x * luma_weights(x.device, x.dtype)).sum(dim=-3, keepdim=True)


@functools.lru_cache
def luma_weights(device, dtype):
    """torchvision's weights of red, green and blue as [3, 1, 1], made once per device."""
    return torch.tensor([0.2989, 0.587, 0.114], dtype=dtype).view(3, 1, 1).to(device)


def adjust_hue(x, shift):
    """Rotate the hue by shift (a fraction of a turn) in HSV space, keeping saturation and value."""
    value, largest = x.max(dim=-3, keepdim=True)  # the first of equal channels: red, then green, as in torchvision
    chroma = value - x.amin(dim=-3, keepdim=True)
    # Hue in sixths of a turn: 2 c + (next channel - the one after) / chroma, from the largest channel c.
    spread = (x.roll(-1, dims=-3) - x.roll(-2, dims=-3)).gather(-3, largest)
    hue = 2 * largest + spread / torch.where(chroma > 0, chroma, 1)
    hue = (hue / 6 + per_image(shift, x)) % 1
    saturation = chroma / torch.where(value > 0, value, 1)
    # Back to RGB: channel c = value * (1 - saturation * clamp(min(k, 4 - k), 0, 1)),
    # k = (n_c + 6 hue) mod 6 with n = 5, 3, 1 for red, green, blue.
    n = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(3, 1, 1)  # made on the device: no copy, no sync
    k = (n + 6 * hue) % 6
    return value * (1 - saturation * torch.minimum(k, 4 - k).clamp(0, 1))


def jitter_stages(apply, order, factors, enabled=(True,) * 4):
    """ColorJitter's work for a batch as a few stages, worked out on the CPU.

    Brightness, contrast and saturation each blend the image with something (black, its mean grey,
    its grey) by a factor, so the images' blends at one stage are one batched blend, in which factor 1
    keeps the images that do nothing at this stage. The hue rotation costs as many launches as three
    blends, so every image's operations are shifted in time to bring all hue rotations to one stage:
    with the four operations in random orders, six blend stages around one hue stage instead of four
    stages of both. Each image still gets its own operations in its own order.

    apply [N] bool, order [N, 4] a permutation of the operations per image, factors [N, 4]; on the
    CPU, so that choosing the rows needs no device synchronisation. enabled: which operations the
    recipe has (ColorJitter skips those it was given no range for).
    Returns a dict: "blend" [stages, 3, N] float32, per stage each image's factor f and the weights
    1 - f of its grey and of its mean grey (both 0 for brightness, which blends with black; f = 1 and
    0, 0 where an image does nothing); "blending", per stage whether any image blends; "hue_stage";
    "hue_rows" [k], the images that rotate their hue there, and their "hue_shift" [k] float32.
    """
    n = len(order)
    active = apply[:, None] & torch.tensor(list(enabled))[order]                      # [N, position]
    hue = active & (order == 3)
    has_hue = hue.any(dim=1)
    hue_at = hue.int().argmax(dim=1)  # where each image rotates its hue, if it does
    hue_stage = int(hue_at[has_hue].max()) if has_hue.any() else 0
    stage_of = torch.arange(4) + torch.where(has_hue, hue_stage - hue_at, 0)[:, None]  # [N, position]
    stages = int(stage_of.max()) + 1
    blends = active & (order < 3)
    factor = torch.where(blends, factors.gather(1, order), 1.0).float()
    rest = 1 - factor  # in float32, as torchvision's _blend computes it
    weights = torch.stack([factor, rest * (order == 2), rest * (order == 1)])           # [3, N, position]
    blend = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).repeat(1, n, stages)          # nothing, unless scattered
    blend.scatter_(2, stage_of.expand(3, -1, -1), weights)
    blending = torch.zeros(n, stages, dtype=torch.bool).scatter_(1, stage_of, blends).any(dim=0)
    hue_rows = has_hue.nonzero().flatten()
    return {"blend": blend.permute(2, 0, 1).contiguous(), "blending": blending.tolist(), "hue_stage": hue_stage,
            "hue_rows": hue_rows, "hue_shift": factors[hue_rows, 3].float()}


def color_jitter(x, jitter):
    """ColorJitter with each image's own factors and order of the four operations; jitter from
    jitter_stages, on x's device."""
    rows = jitter["hue_rows"]
    for stage, blending in enumerate(jitter["blending"]):
        if blending:  # torchvision's _blend with black, the mean grey or the grey, at once
            factor, to_grey, to_mean = jitter["blend"][stage, ..., None, None, None]  # each [N, 1, 1, 1]
            grey = grayscale(x)
            other = to_grey * grey + to_mean * grey.mean(dim=(-3, -2, -1), keepdim=True)  # one term is 0
            x = torch.addcmul(other, factor, x).clamp_(0, 1)  # factor x + (1 - factor) other, in one pass
        if stage == jitter["hue_stage"] and len(rows):  # a shape, known without asking the device
            x[rows] = adjust_hue(x[rows], jitter["hue_shift"])
    return x


def gaussian_blur(x, kernel_size, sigma):
    """torchvision's Gaussian blur (normalised kernel at integer offsets, reflect padding) with one
    sigma per image, as two 1-d passes over a grouped convolution."""
    n, c, h, w = x.shape
    half = (kernel_size - 1) / 2
    offsets = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / per_image(sigma, x).view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [n * c, k]
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)
    return y.view(n, c, h, w)


def augment_plan(params, recipe):
    """What augment_crops needs of the crops' parameters (sample_params), worked out on the CPU:
    per-image choices, the rows and factors of each colour-jitter stage, the rows to blur and their
    sigmas, and the normalisation. Rows chosen on the CPU mean that nothing waits for the device."""
    blur_rows = params["blur"].nonzero().flatten() if recipe.blur_kernel > 1 else torch.zeros(0, dtype=torch.long)
    return {"flip": params["flip"], "grey": params["grey"], "solarize": params["solarize"],
            "jitter": jitter_stages(params["jitter"], params["jitter_order"], params["jitter_factors"],
                                    enabled=[r is not None for r in recipe.jitter]),
            "blur_rows": blur_rows, "blur_sigma": params["sigma"][blur_rows],
            "mean": torch.tensor(recipe.mean).view(3, 1, 1), "std": torch.tensor(recipe.std).view(3, 1, 1)}


def to_device(tree, device):
    """The CPU tensors of a nest of dicts, lists and tuples, on device, in one copy through one pinned
    buffer: a micro-batch's parameters are dozens of small tensors, and as many copies would cost
    more than the work they feed. Each tensor keeps its dtype (float64 holds every value exactly)."""
    leaves = []

    def collect(node):
        if isinstance(node, torch.Tensor):
            leaves.append(node)
        elif isinstance(node, dict):
            for value in node.values():
                collect(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                collect(value)

    collect(tree)
    if not leaves:
        return tree
    # Grouped by dtype, each group is one stretch of the buffer and becomes its dtype in one cast.
    groups = {}
    for leaf in leaves:
        groups.setdefault(leaf.dtype, []).append(leaf)
    flat = torch.cat([torch.cat([leaf.reshape(-1) for leaf in group]).double() for group in groups.values()])
    if device.type == "cuda":
        flat = flat.pin_memory()  # a copy from pageable memory would be staged, and slower
    flat = flat.to(device, non_blocking=True)
    moved, offset = {}, 0
    for dtype, group in groups.items():
        size = sum(leaf.numel() for leaf in group)
        cast, offset = flat[offset:offset + size].to(dtype), offset + size
        for leaf, part in zip(group, cast.split([leaf.numel() for leaf in group])):
            moved[id(leaf)] = part.view(leaf.shape)

    def rebuild(node):
        if isinstance(node, torch.Tensor):
            return moved[id(node)]
        if isinstance(node, dict):
            return {key: rebuild(value) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(rebuild(value) for value in node)
        return node

    return rebuild(tree)


def augment_crops(crops, plan, recipe):
    """Everything after the crop, in the CPU path's order: flip, colour jitter (p), greyscale (p),
    blur (p), solarize (p), normalisation. crops: float [N, 3, H, W] in [0, 1], of one view or of
    both; plan: augment_plan's, on the crops' device."""
    def chosen(name):
        return plan[name].view(-1, 1, 1, 1)

    x = torch.where(chosen("flip"), crops.flip(-1), crops)
    x = color_jitter(x, plan["jitter"])
    x = torch.where(chosen("grey"), grayscale(x).expand_as(x), x)
    rows = plan["blur_rows"]
    if len(rows):  # a shape, known without asking the device
        x[rows] = gaussian_blur(x[rows], recipe.blur_kernel, plan["blur_sigma"])
    x = torch.where(chosen("solarize") & (x >= recipe.solarize_threshold / 255), 1 - x, x)  # an 8-bit threshold
    return (x - plan["mean"].to(x.dtype)) / plan["std"].to(x.dtype)


# ------------------------------------------------------------------------------------------------
# The two views of a micro-batch
# ------------------------------------------------------------------------------------------------

class DeviceTwoViews:
    """Decodes a micro-batch from UndecodedImages and makes its two views on device.

    view1, view2: the two views' recipes (mdra.view_augmentations); offline_views: the recipes of the
    offline encoder's own two views (--offline-view weak), made after them, or none. The crops of all
    views are augmented as one batch, each with the parameters of its own view's recipe: after the crop,
    a fraction of the launches of augmenting each view on its own.
    """

    def __init__(self, view1, view2, seed, rank, world_size, device, offline_views=()):
        self.recipes = (view1, view2, *offline_views)
        self.recipe = shared_recipe(self.recipes)
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, torch.device(device)

    def params(self, n, epoch, batch_index):
        """The parameters of this rank's n images of global micro-batch batch_index, as [V n] rows, V the
        number of views: view 1's, then view 2's (then the offline views'). Each view's are drawn in turn for
        the whole global micro-batch, of which this rank takes its rows: a view's do not depend on those of
        the views after it."""
        generator = torch.Generator().manual_seed(runtime.sample_seed(self.seed, epoch, batch_index))
        rows = slice(self.rank * n, (self.rank + 1) * n)
        views = [sample_params(recipe, n * self.world_size, generator) for recipe in self.recipes]
        return {k: torch.cat([view[k][rows] for view in views]) for k in views[0]}

    def prefetch(self, batches, epoch, first_index):
        """The views of batches (global micro-batches first_index, first_index + 1, ... of epoch),
        made ahead in a background thread: a Prefetcher."""
        return Prefetcher(self, batches, epoch, first_index)

    def __call__(self, images, skipped, epoch, batch_index):
        """images, skipped: a batch of collate_undecoded. Returns (v1, v2, skipped) as the CPU loader, or
        (v1, v2, w1, w2, skipped) with the offline encoder's views."""
        if isinstance(images, torch.Tensor):
            images = images.to(self.device, non_blocking=True)
            heights = torch.full((len(images),), images.shape[-2])
            widths = torch.full((len(images),), images.shape[-1])
        else:
            images, failed = decode(images, self.device)
            skipped = skipped + failed
            heights = torch.tensor([x.shape[-2] for x in images])
            widths = torch.tensor([x.shape[-1] for x in images])
        params, views = self.params(len(images), epoch, batch_index), len(self.recipes)
        boxes = crop_boxes(params, heights.repeat(views), widths.repeat(views), self.recipe.ratio)
        plan = augment_plan(params, self.recipe)
        boxes, plan = to_device((boxes, plan), self.device)
        crops = resized_crops(images, boxes.view(views, -1, 4), self.recipe.size) / 255
        return *augment_crops(crops, plan, self.recipe).chunk(views), skipped


class HeldCrops:
    """finetune.py --gpu-aug: a labelled in-memory data set held on the device as uint8 (grey images as
    one channel), in place of the loader of its training transform (a random resized crop and a
    horizontal flip, mdra.ViewAugmentation): each micro-batch is gathered there by the indices of
    sampler (an mdra.EpochSampler) and cropped and flipped in one batch. The parameters are drawn as
    DeviceTwoViews draws a view's: from a generator seeded by (seed, epoch, micro-batch index), for the
    global micro-batch, of which this rank takes its rows.

    Yields what finetune.py's loader yields: (float crops [b, 3, *size] on the 0-255 scale, labels,
    [b] skipped counts, no unread lines); nothing in memory is unreadable.
    """

    def __init__(self, images, labels, recipe, sampler, seed, rank, world_size, device):
        self.images = images.to(device)
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(device)
        self.recipe, self.sampler, self.seed, self.rank, self.world_size = recipe, sampler, seed, rank, world_size
        self.no_skips = torch.zeros(sampler.local_batch, dtype=torch.long)

    def crops(self, images, epoch, batch_index):
        """The crops of this rank's images of global micro-batch batch_index, flipped where drawn."""
        n, (height, width) = len(images), images.shape[-2:]
        generator = torch.Generator().manual_seed(runtime.sample_seed(self.seed, epoch, batch_index))
        params = sample_params(self.recipe, n * self.world_size, generator)
        params = {k: v[self.rank * n:(self.rank + 1) * n] for k, v in params.items()}
        boxes = crop_boxes(params, torch.full((n,), height), torch.full((n,), width), self.recipe.ratio)
        boxes, flip = to_device((boxes, params["flip"]), images.device)
        crops = resized_crops(images, boxes[None], self.recipe.size)  # each channel alone: grey stays one
        crops = torch.where(flip.view(-1, 1, 1, 1), crops.flip(-1), crops)
        return crops if crops.shape[1] == 3 else crops.repeat(1, 3, 1, 1)  # a tensor of its own, written in place next

    def __iter__(self):
        epoch = self.sampler.epoch
        for batch_index, indices in enumerate(self.sampler.batches(self.images.device), self.sampler.start_batch):
            crops = self.crops(self.images.index_select(0, indices), epoch, batch_index)
            yield crops, self.labels.index_select(0, indices), self.no_skips, ()

    def summary(self):
        megabytes = self.images.numel() * self.images.element_size() / 1e6
        return (f"--gpu-aug: {len(self.images)} labelled images held on {self.images.device} as uint8 "
                f"({megabytes:.1f} MB), cropped and flipped there in batches, no loader workers")


class HeldImages:
    """finetune.py --gpu-aug: evaluation images held on the device as uint8, when their centre crop is the
    whole image (a small data set at its own size): batches of this rank's share, as its loader gives them,
    (uint8 [b, 3, H, W], labels, no unread names)."""

    def __init__(self, images, labels, batch_size, device):
        self.images = images.to(device)
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(device)
        self.batch_size = batch_size

    def __iter__(self):
        for first in range(0, len(self.images), self.batch_size):
            rows = slice(first, first + self.batch_size)
            yield self.images[rows].expand(-1, 3, -1, -1), self.labels[rows], ()


def with_index(device):
    """A CUDA device with its index (cuda -> cuda:<current device>): a thread must name its device, as
    the current device is per thread."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class Prefetcher:
    """The device views of an epoch's micro-batches, made one or two ahead by a background thread
    (on a side stream of its own on CUDA) while the training loop runs the current step.

    Making a micro-batch's views launches a few hundred small kernels: ~20 ms of host time per batch
    of 64 at 224 px against ~5 ms of device time, as measured on an H100 machine before their host
    operations were cut to less than half (BENCHMARKS.md sections 11, 13 and 14). Made in the loop,
    that host time adds to the step's; made here, it overlaps it (PyTorch releases the GIL while it
    launches work).

    batches: the loader's iterator over collate_undecoded batches; batch k of it is global micro-batch
    first_index + k of the epoch, which seeds its parameters as before, so the views are exactly
    those the loop would have made itself. Yields (v1, v2, skipped, unread) ready for the current stream
    ((v1, v2, w1, w2, skipped, unread) with the offline encoder's views).
    """

    _END = object()

    def __init__(self, device_views, batches, epoch, first_index, depth=2):
        self.device = with_index(device_views.device)
        self.cuda = self.device.type == "cuda"
        self.ready = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._work, args=(device_views, batches, epoch, first_index),
                                       name="gpu_aug prefetch", daemon=True)
        self.thread.start()

    def _work(self, device_views, batches, epoch, first_index):
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)  # the current device is per thread
                stream = side_stream(self.device, "prefetch")
            batches = iter(batches)
            with torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext():
                for index in itertools.count(first_index):
                    with runtime.DEVICE_WORK_LOCK:  # no device work while a CUDA graph is captured
                        batch = next(batches, None)  # held images are gathered on the device here
                        if batch is None:
                            break
                        images, skipped, unread = batch
                        views = (*device_views(images, skipped, epoch, index), unread)
                        done = None
                        if self.cuda:
                            done = torch.cuda.Event()
                            done.record(stream)
                    if not self._put((views, done)):
                        return
            self._put(self._END)
        except BaseException as error:  # handed to the training loop, which raises it
            self._put(error)

    def _put(self, item):
        """Wait for room in the queue unless stopping; returns False when stopped."""
        while not self.stopping.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        item = self.ready.get()
        if item is self._END:
            self.ready.put(item)  # a later call stops again
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        (*views, skipped, unread), done = item
        if self.cuda:  # the current stream waits on the device, not the host, and keeps the memory alive
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            for view in views:
                view.record_stream(current)
        return *views, skipped, unread

    def close(self):
        """Stop the thread (a run that ends inside an epoch leaves batches unread)."""
        self.stopping.set()
        self.thread.join()
