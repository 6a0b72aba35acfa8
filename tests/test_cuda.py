"""What only a GPU can check: the captured step (--cuda-graph) and the CUDA kernels of the new paths,
against the plain eager path on the same GPU. Skipped without CUDA; benchmarks/device_check runs them.

Two separate runs agree only to rounding, and float32 rounding is no fixed bound after a few steps: the
BatchNorm biases, near 0 at the start, have nearly cancelling gradients, and a difference of 1e-7 in one
step grew to 6e-4 of their largest value by the next on a CPU (one pass against two), while cuDNN's
autotuned kernels need not sum in the same order twice. So the weights are compared in float64 (networks,
images and queue; amp off), where the captured step must equal the eager one to 1e-8; a bf16 run and the
--gpu-aug views (float32 by construction) are compared by their losses."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

import gpu_aug
import mdra
import runtime
from test_gpu_aug import jpeg_bytes
from test_mdra_runs import TINY, default_dtype, load, log_records

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ON_CUDA = [*TINY, "--device", "cuda", "--no-compile", "--amp", "off", "--no-channels-last"]
FLOAT32_CASES = {"bf16": ["--amp", "bf16", "--channels-last"],
                 "gpu-aug": ["--gpu-aug"]}  # the prefetch thread makes the views on its own stream during capture


def run(out_dir, *extra, dtype=torch.float64):
    with default_dtype(dtype):
        return mdra.main([*ON_CUDA, "--out-dir", str(out_dir), *extra])


def losses(out_dir):
    return [r["loss"] for r in log_records(out_dir) if "pairs_per_s" in r]


def assert_close_states(a, b, tolerance):
    for part in ("online", "offline"):
        for name, expected in b[part].items():
            scale = max(expected.abs().max().item(), 1e-3) if expected.is_floating_point() else 0
            torch.testing.assert_close(a[part][name], expected, rtol=0, atol=tolerance * scale, msg=f"{part}.{name}")


@pytest.mark.parametrize("extra", [
    [], ["--accum-steps", "2"],
    ["--workers", "2"],  # the loader's pin-memory thread uses CUDA while the graphs are captured
], ids=["plain", "accumulation", "workers"])
def test_the_captured_step_replays_what_the_eager_step_computes_in_float64(tmp_path, capsys, extra):
    # 3 eager steps, then the graphs, replayed for 3 steps that cross an epoch (4 steps an epoch, 2 with accumulation)
    steps = ["--epochs", "3", "--max-steps", "6", *extra]
    eager = load(run(tmp_path / "eager", *steps))
    capsys.readouterr()
    captured = load(run(tmp_path / "captured", *steps, "--cuda-graph"))
    assert "replayed from step 4" in capsys.readouterr().out
    assert captured["queue"].dtype == torch.float64
    assert losses(tmp_path / "captured") == pytest.approx(losses(tmp_path / "eager"), rel=1e-9)
    assert captured["queue_ptr"] == eager["queue_ptr"]
    assert_close_states(captured, eager, 1e-8)
    torch.testing.assert_close(captured["queue"], eager["queue"], rtol=0, atol=1e-8)


@pytest.mark.parametrize("case", FLOAT32_CASES)
def test_the_captured_step_in_float32_and_bf16_gives_the_eager_steps_losses(tmp_path, capsys, case):
    steps = ["--epochs", "3", "--max-steps", "6", *FLOAT32_CASES[case]]
    eager = load(run(tmp_path / "eager", *steps, dtype=torch.float32))
    capsys.readouterr()
    captured = load(run(tmp_path / "captured", *steps, "--cuda-graph", dtype=torch.float32))
    assert "replayed from step 4" in capsys.readouterr().out
    assert captured["queue_ptr"] == eager["queue_ptr"] and captured["step"] == 6
    assert losses(tmp_path / "captured") == pytest.approx(losses(tmp_path / "eager"), rel=1e-2 if case == "bf16" else 1e-3)


def test_a_captured_run_resumes_and_its_checkpoint_goes_on_uncaptured(tmp_path, capsys):
    run(tmp_path / "a", "--epochs", "3", "--max-steps", "5", "--cuda-graph")
    capsys.readouterr()
    resumed = load(run(tmp_path / "a", "--epochs", "3", "--max-steps", "9", "--cuda-graph"))
    assert "replayed from step 9" in capsys.readouterr().out  # 3 eager steps again after the resume
    plain = load(run(tmp_path / "plain", "--epochs", "3", "--max-steps", "9"))
    assert resumed["queue_ptr"] == plain["queue_ptr"]
    assert_close_states(resumed, plain, 1e-8)
    assert load(run(tmp_path / "a", "--epochs", "3", "--max-steps", "10"))["step"] == 10


def test_one_pass_on_the_gpu_trains_the_network_of_two_passes(tmp_path):
    steps = ["--epochs", "2", "--max-steps", "3", "--channels-last"]
    two = load(run(tmp_path / "two", *steps))
    one = load(run(tmp_path / "one", *steps, "--one-pass"))
    assert_close_states(one, two, 1e-8)
    bf16 = [*steps, "--amp", "bf16"]
    run(tmp_path / "two16", *bf16, dtype=torch.float32)
    run(tmp_path / "one16", *bf16, "--one-pass", dtype=torch.float32)
    assert losses(tmp_path / "one16") == pytest.approx(losses(tmp_path / "two16"), rel=1e-2)


def test_the_device_paths_streams_are_their_own_however_many_streams_are_drawn():
    # PyTorch's pooled streams come round again after 32 of a priority: a prefetch stream drawn anew each
    # epoch became the decode stream every 32nd epoch, and then nothing kept nvJPEG's writes in order.
    device = torch.device("cuda", torch.cuda.current_device())
    decode, prefetch = gpu_aug.side_stream(device, "decode"), gpu_aug.side_stream(device, "prefetch")
    drawn = {torch.cuda.Stream(device).cuda_stream for _ in range(40)}  # every default-priority stream of the pool
    assert len({decode.cuda_stream, prefetch.cuda_stream} | drawn) == len(drawn) + 2
    assert gpu_aug.side_stream(device, "prefetch") is prefetch  # the same for every epoch


def smooth(mode, width=40, height=32):
    """Gradients in each channel, as mode: what two JPEG decoders' IDCTs and upsampling agree on closely."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def test_jpegs_decoded_on_the_gpu_are_the_images_the_cpu_loader_reads():
    files = {"rgb 4:2:0": jpeg_bytes(smooth("RGB")), "rgb 4:4:4": jpeg_bytes(smooth("RGB"), subsampling=0),
             "grey": jpeg_bytes(smooth("L")), "progressive": jpeg_bytes(smooth("RGB"), progressive=True),
             "cmyk": jpeg_bytes(smooth("CMYK"))}
    decoded, failed = gpu_aug.decode(list(files.values()), torch.device("cuda"))
    assert failed.tolist() == [0] * len(files)
    for (name, data), image in zip(files.items(), decoded):
        with Image.open(io.BytesIO(data.numpy().tobytes())) as pil:
            expected = pil_to_tensor(runtime.rgb(pil))  # as runtime.read_image reads it
        assert image.is_cuda and image.dtype == torch.uint8 and image.shape == expected.shape == (3, 32, 40), name
        assert (image.cpu().float() - expected.float()).abs().mean() < 2, name  # torchvision's bound for its decoders


def test_gpu_aug_trains_on_a_folder_of_jpegs_decoded_on_the_gpu_over_two_epochs(tmp_path, capsys):
    rng = np.random.default_rng(7)
    for i in range(32):
        (tmp_path / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        size = (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
        smooth("RGB", *size).rotate(int(rng.integers(0, 360))).save(tmp_path / "data" / f"c{i % 2}" / f"{i}.jpg")
    ckpt = load(mdra.main([*ON_CUDA, "--data", str(tmp_path / "data"), "--img-size", "16", "--epochs", "2",
                           "--accum-steps", "1", "--workers", "1", "--gpu-aug", "--out-dir", str(tmp_path / "run")]))
    assert ckpt["step"] == 4 and torch.isfinite(ckpt["queue"]).all()
    assert "held on" not in capsys.readouterr().out  # read by the loader and decoded on the GPU


def test_compiled_modules_inside_the_captured_step_replay_what_the_eager_step_computes(tmp_path, capsys):
    # Last in this file: its two inductor compilations take longest, and the device check's test budget
    # may stop it before it ends, but not the tests above.
    test_the_captured_step_replays_what_the_eager_step_computes_in_float64(
        tmp_path, capsys, ["--compile", "--compile-backend", "inductor"])
