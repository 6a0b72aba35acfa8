"""What only a GPU can check: mdra.py --gpu-aug's views made by the CUDA kernels against the same code on CPU
tensors, and a --gpu-aug run on CUDA that resumes. Skipped without CUDA; benchmarks/device_check runs them.

Two runs on a GPU agree only to rounding (cuDNN's autotuned kernels need not sum in the same order twice), and
float32 rounding is no fixed bound after a few steps: the BatchNorm biases, near 0 at the start, have nearly
cancelling gradients. So the resumed run is compared in float64 (networks and queue; amp off), where it must
equal the uninterrupted one to 1e-8 of each tensor's largest value."""
import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data
import gpu_aug
import mdra

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# 32 synthetic images of 16 px, micro-batches of 8, 2 per optimizer step: 2 steps an epoch.
ON_CUDA = ["--data", "synthetic:32", "--img-size", "16", "--arch", "resnet10-w8", "--hidden-dim", "32",
           "--batch-size", "8", "--accum-steps", "2", "--queue-size", "32", "--warmup-epochs", "0", "--epochs", "2",
           "--workers", "0", "--log-every", "1", "--device", "cuda", "--gpu-aug"]
EXACT = ["--no-compile", "--amp", "off", "--no-channels-last"]


@contextlib.contextmanager
def default_dtype(dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@contextlib.contextmanager
def no_tf32():
    """Float32 convolutions (the blur) in float32: mdra.py turns cuDNN's TF32 on for the process."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("channels", [1, 3])
def test_gpu_aug_views_on_cuda_equal_the_same_code_on_cpu_tensors(channels):
    shape = (32, 56, 56) if channels == 1 else (32, 56, 56, 3)
    images = data.ArrayImages(np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8), [0] * 32, ["a"])
    info = data.DataInfo("small", 10, [], 56, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), True)
    views = mdra.view_augmentations(info, 48, solarize=0.5)  # 48 px: blurred (kernel 5), view 2 solarized
    made = {}
    for device in ("cpu", "cuda"):
        sampler = data.EpochSampler(32, 16, 2, 1, 0, seed=3)
        sampler.set_epoch(1)
        env = SimpleNamespace(device=torch.device(device), rank=0, world_size=1)
        with no_tf32():
            device_views = gpu_aug.DeviceViews(images, views, sampler, 3, env)
            made[device] = [(v1.cpu(), v2.cpu()) for v1, v2, _, _ in device_views]
    assert len(made["cuda"]) == 2
    for b, (cpu_views, cuda_views) in enumerate(zip(made["cpu"], made["cuda"])):
        for view, (expected, actual) in enumerate(zip(cpu_views, cuda_views)):
            assert actual.shape == expected.shape == (16, 3, 48, 48) and actual.dtype == expected.dtype
            # To float32 rounding, but for the rare pixel that rounding puts on the other side of solarize's threshold.
            off = (actual - expected).abs() > 1e-4
            assert off.float().mean() < 1e-4, (b, view, (actual - expected).abs().max())


def test_mdra_gpu_aug_on_cuda_resumes_to_float64_rounding(tmp_path):
    # 4 steps straight, against 3 steps then a resumed run that starts at micro-batch 2 of epoch 2.
    with default_dtype(torch.float64):
        straight = load(mdra.main([*ON_CUDA, *EXACT, "--out-dir", str(tmp_path / "straight")]))
        interrupted = load(mdra.main([*ON_CUDA, *EXACT, "--out-dir", str(tmp_path / "resumed"), "--max-steps", "3"]))
        resumed = load(mdra.main([*ON_CUDA, *EXACT, "--out-dir", str(tmp_path / "resumed")]))
    assert (interrupted["step"], straight["step"], resumed["step"]) == (3, 4, 4)
    assert straight["queue"].dtype == torch.float64 and straight["queue_ptr"] == resumed["queue_ptr"]
    for part in ("online", "offline"):  # weights and BatchNorm statistics
        assert straight[part].keys() == resumed[part].keys()
        for name, expected in straight[part].items():
            scale = max(expected.abs().max().item(), 1e-3) if expected.is_floating_point() else 0
            torch.testing.assert_close(resumed[part][name], expected, rtol=0, atol=1e-8 * scale, msg=f"{part}.{name}")
    torch.testing.assert_close(resumed["queue"], straight["queue"], rtol=0, atol=1e-8)
    assert not torch.equal(interrupted["queue"], resumed["queue"])  # the resumed run trained on


def test_mdra_gpu_aug_on_cuda_trains_with_the_default_bf16_and_channels_last(tmp_path):
    ckpt = load(mdra.main([*ON_CUDA, "--no-compile", "--max-steps", "2", "--out-dir", str(tmp_path)]))
    assert ckpt["step"] == 2 and ckpt["args"]["amp"] == "bf16" and ckpt["args"]["channels_last"]
    assert torch.isfinite(ckpt["queue"]).all() and all(torch.isfinite(v).all() for v in ckpt["online"].values()
                                                      if v.is_floating_point())
