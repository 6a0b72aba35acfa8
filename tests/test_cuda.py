"""What only a GPU can check: the captured step (--cuda-graph) and the CUDA kernels of the new paths,
against the plain eager path on the same GPU. Skipped without CUDA; benchmarks/device_check runs them."""
import pytest
import torch

import mdra
from test_mdra_runs import TINY, load, log_records

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ON_CUDA = [*TINY, "--device", "cuda", "--no-compile", "--amp", "off", "--no-channels-last"]


def run(out_dir, *extra):
    return mdra.main([*ON_CUDA, "--out-dir", str(out_dir), *extra])


def assert_close_states(a, b, tolerance):
    for part in ("online", "offline"):
        for name, expected in b[part].items():
            scale = max(expected.abs().max().item(), 1e-3) if expected.is_floating_point() else 0
            torch.testing.assert_close(a[part][name], expected, rtol=0, atol=tolerance * scale, msg=f"{part}.{name}")


@pytest.mark.parametrize("extra", [
    [], ["--accum-steps", "2"], ["--amp", "bf16", "--channels-last"],
    ["--workers", "2"],  # the loader's pin-memory thread uses CUDA while the graphs are captured
    ["--gpu-aug"],  # and so does the prefetch thread, which makes the views on its own stream
    ["--compile", "--compile-backend", "inductor"],  # compiled modules inside the captured step, as CUDA's default
])
def test_the_captured_step_replays_what_the_eager_step_computes(tmp_path, capsys, extra):
    # 3 eager steps, then the graphs, replayed for 3 steps that cross an epoch (4 steps an epoch, 2 with accumulation)
    steps = ["--epochs", "3", "--max-steps", "6", *extra]
    eager = load(run(tmp_path / "eager", *steps))
    capsys.readouterr()
    captured = load(run(tmp_path / "captured", *steps, "--cuda-graph"))
    assert "replayed from step 4" in capsys.readouterr().out
    losses = [r["loss"] for r in log_records(tmp_path / "eager") if "pairs_per_s" in r]
    assert [r["loss"] for r in log_records(tmp_path / "captured") if "pairs_per_s" in r] == pytest.approx(
        losses, rel=1e-2 if "bf16" in extra else 1e-4)  # --gpu-aug: the same views in both runs
    assert captured["queue_ptr"] == eager["queue_ptr"]
    assert_close_states(captured, eager, 1e-2 if "bf16" in extra else 1e-3)
    torch.testing.assert_close(captured["queue"], eager["queue"], rtol=0, atol=1e-2)


def test_a_captured_run_resumes_and_its_checkpoint_goes_on_uncaptured(tmp_path, capsys):
    run(tmp_path / "a", "--epochs", "3", "--max-steps", "5", "--cuda-graph")
    capsys.readouterr()
    resumed = load(run(tmp_path / "a", "--epochs", "3", "--max-steps", "9", "--cuda-graph"))
    assert "replayed from step 9" in capsys.readouterr().out  # 3 eager steps again after the resume
    plain = load(run(tmp_path / "plain", "--epochs", "3", "--max-steps", "9"))
    assert resumed["queue_ptr"] == plain["queue_ptr"]
    assert_close_states(resumed, plain, 1e-3)
    assert load(run(tmp_path / "a", "--epochs", "3", "--max-steps", "10"))["step"] == 10


def test_one_pass_on_the_gpu_trains_the_network_of_two_passes(tmp_path):
    steps = ["--epochs", "2", "--max-steps", "3", "--amp", "bf16", "--channels-last"]
    two = load(run(tmp_path / "two", *steps))
    one = load(run(tmp_path / "one", *steps, "--one-pass"))
    assert_close_states(one, two, 1e-2)
