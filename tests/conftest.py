"""Fixtures that several test files share: folders that cannot be written to, and a disk that fills up."""
import os
import subprocess

import pytest


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
