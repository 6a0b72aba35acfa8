"""Fixtures that several test files share: folders that cannot be written to, a disk that fills up, and
processes started as torchrun starts its ranks."""
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def mount(*args):
    """mount(8) with these arguments; False where this sandbox or user may not mount."""
    try:
        return subprocess.run(["mount", *args], capture_output=True, timeout=30).returncode == 0
    except OSError:  # no mount(8)
        return False


@pytest.fixture
def make_read_only():
    """make_read_only(folder): nothing can be created in folder until the test ends. Permissions stop
    only other users than root; root gets a read-only bind mount where it may mount."""
    undo = []

    def make(folder):
        if os.geteuid() != 0:
            folder.chmod(0o555)
            undo.append(lambda: folder.chmod(0o755))
        elif mount("--bind", "-o", "ro", str(folder), str(folder)):
            undo.append(lambda: subprocess.run(["umount", str(folder)], check=True))
        else:
            pytest.skip("running as root, and mounting is not allowed here")
        return folder

    yield make
    for step in reversed(undo):
        step()


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 1 MiB tmpfs of its own, a disk that a few MB fill; skipped where mounting is not allowed."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if not mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)):
        pytest.skip("mounting a tmpfs is not allowed here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


class Ranks:
    """`python ARGS` as `processes` ranks of one process group on this machine, each with the environment
    torchrun gives it (OMP_NUM_THREADS=1 among it), but without torchrun's own process, which would spend
    seconds importing torch (test_mdra_runs.py runs torchrun itself)."""

    def __init__(self, args, processes, env=None):
        with socket.socket() as s:  # a free port for rank 0's store
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.outputs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(processes)]
        self.processes = [
            subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, stdout=out, stderr=err, text=True,
                             env={"OMP_NUM_THREADS": "1", **os.environ, **(env or {}), "PYTHONPATH": str(REPO),
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(processes),
                                  "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(processes)})
            for rank, (out, err) in enumerate(self.outputs)]

    def wait(self, timeout=120):
        """Each rank's standard output once all have ended. Once a rank fails, or timeout seconds have passed,
        the others are stopped (as torchrun stops them: they would wait for it in a collective) and the test
        fails with the standard error of each rank that failed."""
        deadline = time.monotonic() + timeout
        while (any(p.poll() is None for p in self.processes) and time.monotonic() < deadline
               and all(p.returncode in (None, 0) for p in self.processes)):
            time.sleep(0.05)
        running = [r for r, p in enumerate(self.processes) if p.poll() is None]
        self.stop()
        failed = [r for r, p in enumerate(self.processes) if p.returncode != 0 and r not in running]
        if failed or running:
            why = "after another failed" if failed else f"at the time limit of {timeout} s"
            pytest.fail("\n".join([f"rank {r} failed:\n{self.read(r, 1)[-3000:]}" for r in failed]
                                   + [f"rank {r} was stopped {why}" for r in running]))
        return [self.read(rank, 0) for rank in range(len(self.processes))]

    def read(self, rank, stream):
        f = self.outputs[rank][stream]
        f.seek(0)
        return f.read()

    def stop(self):
        for p in self.processes:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture
def gloo_ranks():
    """gloo_ranks(args, processes, env=None) -> Ranks, started; any still running when the test ends are stopped."""
    started = []

    def start(args, processes, env=None):
        started.append(Ranks(args, processes, env))
        return started[-1]

    yield start
    for ranks in started:
        ranks.stop()
        for out, err in ranks.outputs:
            out.close(), err.close()
