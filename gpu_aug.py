"""mdra.py --gpu-aug: an in-memory data set held on the device as uint8, and both views of every micro-batch
made there, in batches, without loader workers (a speed path outside the reading path; off until a GPU
measurement shows it faster).

At small image sizes a GPU step takes less time than the CPU loader's workers need to decode and augment
its images one by one. Here each micro-batch is gathered on the device by one indexing operation and
augmented as a batch, every image with its own random parameters, following the views' definitions
(mdra.ViewAugmentation) as the loader's torchvision transforms do: random resized crop, horizontal flip,
colour jitter in a random order, greyscale, Gaussian blur, solarize, normalisation. Two differences are
deliberate: crops are resized bilinearly with area averaging (roi_align) instead of bicubically, and
intermediate results are not rounded to 8 bits.

The random parameters of a view are one matrix of uniforms drawn on the CPU from a generator seeded by
(seed, epoch, micro-batch), for the global micro-batch, of which each rank takes its rows: the views depend
neither on the number of ranks nor on whether the run was resumed. The same code runs on CPU tensors.
"""
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

import data
from runtime import UsageError

TRIES = 10  # RandomResizedCrop's attempts at a crop of the drawn area and aspect ratio
# The columns of a view's uniforms: (first column, number of columns) of each parameter.
COLUMNS = {"area": (0, TRIES), "log_ratio": (TRIES, TRIES), "position": (2 * TRIES, 2), "flip": (22, 1),
           "jitter": (23, 1), "order": (24, 4), "factors": (28, 4), "grey": (32, 1), "blur": (33, 1), "sigma": (34, 1),
           "solarize": (35, 1)}
WIDTH = 36


class DeviceViews:
    """In place of mdra.py's loader: images (a data set with as_tensor()) held on env's device, and for each
    of this rank's micro-batches of sampler (an mdra.EpochSampler) the two views of views (mdra's
    ViewAugmentation pair), yielded as the loader yields them: (v1, v2, skipped counts, no unread lines)."""

    def __init__(self, images, views, sampler, seed, env):
        if not hasattr(images, "as_tensor"):
            raise UsageError(f"--gpu-aug holds an in-memory data set ({', '.join(data.SMALL_DATASETS)}) on the device; "
                             "an image folder is read by the loader: leave --gpu-aug out.")
        self.images = images.as_tensor().to(env.device)  # uint8 [n, C, H, W], C = 1 for grey images
        self.views, self.sampler, self.seed, self.rank, self.world_size = views, sampler, seed, env.rank, env.world_size
        self.no_skips = torch.zeros(sampler.local_batch, dtype=torch.long)  # nothing held in memory is unreadable

    def __iter__(self):
        epoch, first = self.sampler.epoch, self.sampler.start_batch
        for batch_index, indices in enumerate(self.sampler.batches(self.images.device), first):
            images = self.images.index_select(0, indices)
            generator = torch.Generator().manual_seed(data.sample_seed(self.seed, epoch, batch_index))
            rows = slice(self.rank * len(images), (self.rank + 1) * len(images))
            v1, v2 = (augment(images, view, uniforms(len(images) * self.world_size, generator)[rows])
                      for view in self.views)
            yield v1, v2, self.no_skips, ()


def uniforms(n, generator):
    """A view's random parameters for n images: [n, WIDTH] uniforms in [0, 1) (float64, exact for every draw)."""
    return torch.rand(n, WIDTH, generator=generator, dtype=torch.float64)


def column(u, name):
    first, width = COLUMNS[name]
    return u[:, first:first + width] if width > 1 else u[:, first]


def between(low_high, u):
    low, high = low_high
    return low + (high - low) * u


def crop_boxes(u, height, width, view):
    """RandomResizedCrop.get_params for a batch of images of one size: the first of the TRIES whose crop
    fits, placed uniformly among the whole-pixel positions, else the central crop of the nearest allowed
    aspect ratio. Returns [n, 4] float64 boxes (x1, y1, x2, y2) in pixel edges."""
    H, W = float(height), float(width)
    log_ratio = torch.tensor(view.ratio, dtype=torch.float64).log().tolist()
    area = H * W * between(view.scale, column(u, "area"))
    aspect = between(log_ratio, column(u, "log_ratio")).exp()
    w_try, h_try = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (w_try > 0) & (w_try <= W) & (h_try > 0) & (h_try <= H)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first try that fits
    found = fits.any(dim=1)
    low, high = min(view.ratio), max(view.ratio)
    w_central = W if low <= W / H <= high else round(H * high) if W / H > high else W
    h_central = H if low <= W / H <= high else round(W / low) if W / H < low else H
    w = torch.where(found, w_try.gather(1, first)[:, 0], w_central)
    h = torch.where(found, h_try.gather(1, first)[:, 0], h_central)
    position = column(u, "position")
    top = torch.where(found, (position[:, 0] * (H - h + 1)).floor(), ((H - h) / 2).floor())
    left = torch.where(found, (position[:, 1] * (W - w + 1)).floor(), ((W - w) / 2).floor())
    return torch.stack([left, top, left + w, top + h], dim=1)


def augment(images, view, u):
    """The view of images (uint8 [n, C, H, W] on the device) with each image's parameters from its row of
    the uniforms u: float32 [n, 3, *view.size], normalised."""
    u = u.to(images.device, non_blocking=True)
    boxes = crop_boxes(u, *images.shape[-2:], view)
    rois = torch.cat([torch.arange(len(images), device=u.device, dtype=u.dtype)[:, None], boxes], dim=1)
    x = roi_align(images.float(), rois.float(), view.size, sampling_ratio=-1, aligned=True) / 255
    x = x.expand(-1, 3, -1, -1)  # grey images: cropped as one channel, then RGB

    def chosen(name, p):
        return (column(u, name) < p).view(-1, 1, 1, 1)

    x = torch.where(chosen("flip", view.flip_p), x.flip(-1), x)
    if view.jitter_p > 0:
        x = color_jitter(x, view, column(u, "order").argsort(dim=1), column(u, "factors"), chosen("jitter", view.jitter_p))
    x = torch.where(chosen("grey", view.grey_p), grayscale(x).expand_as(x), x)
    if view.blur_p > 0:
        sigma = between(view.blur_sigma, column(u, "sigma"))
        x = torch.where(chosen("blur", view.blur_p), gaussian_blur(x, view.blur_kernel, sigma), x)
    x = torch.where(chosen("solarize", view.solarize_p) & (x >= view.solarize_threshold / 255), 1 - x, x)
    mean, std = (torch.tensor(v, device=x.device).view(3, 1, 1) for v in (view.mean, view.std))
    return (x - mean) / std


def per_image(values, x):
    """A [n] parameter as [n, 1, 1, 1] in x's dtype, to broadcast over images."""
    return values.to(x.dtype).view(-1, 1, 1, 1)


def grayscale(x):
    """ITU-R 601-2 luma with torchvision's weights: [n, 1, H, W]."""
    weights = torch.tensor([0.2989, 0.587, 0.114], dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * weights).sum(dim=-3, keepdim=True)


def color_jitter(x, view, order, factors, apply):
    """ColorJitter with each image's own order of its four operations (order [n, 4], a permutation of
    brightness, contrast, saturation, hue) and factors (uniforms [n, 4], scaled to view.jitter's ranges);
    only where apply [n, 1, 1, 1]. An operation without a range (None) is left out, as torchvision does."""
    ranges = view.jitter
    for position in range(4):
        for op, low_high in enumerate(ranges):
            if low_high is None:
                continue
            f = per_image(between(low_high, factors[:, op]), x)
            if op == 3:
                changed = adjust_hue(x, f)
            else:  # torchvision's blend with black, the mean grey, or the grey
                other = 0 if op == 0 else grayscale(x).mean(dim=(-3, -2, -1), keepdim=True) if op == 1 else grayscale(x)
                changed = (f * x + (1 - f) * other).clamp(0, 1)
            x = torch.where(apply & (order[:, position] == op).view(-1, 1, 1, 1), changed, x)
    return x


def adjust_hue(x, shift):
    """Rotate the hue by shift [n, 1, 1, 1] (a fraction of a turn) in HSV space, keeping saturation and value."""
    value, largest = x.max(dim=-3, keepdim=True)  # the first of equal channels: red, then green, as in torchvision
    chroma = value - x.amin(dim=-3, keepdim=True)
    # Hue in sixths of a turn: 2 c + (next channel - the one after) / chroma, from the largest channel c.
    spread = (x.roll(-1, dims=-3) - x.roll(-2, dims=-3)).gather(-3, largest)
    hue = ((2 * largest + spread / torch.where(chroma > 0, chroma, 1)) / 6 + shift) % 1
    saturation = chroma / torch.where(value > 0, value, 1)
    # Back to RGB: channel c = value * (1 - saturation * clamp(min(k, 4 - k), 0, 1)),
    # k = (n_c + 6 hue) mod 6 with n = 5, 3, 1 for red, green, blue.
    k = (torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(3, 1, 1) + 6 * hue) % 6
    return value * (1 - saturation * torch.minimum(k, 4 - k).clamp(0, 1))


def gaussian_blur(x, kernel_size, sigma):
    """torchvision's Gaussian blur (normalised kernel at integer offsets, reflect padding) with one sigma
    per image, as two 1-d passes of a grouped convolution."""
    n, c, h, w = x.shape
    half = (kernel_size - 1) / 2
    offsets = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma.to(x.dtype).view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [n * c, k]
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)
    return y.view(n, c, h, w)
