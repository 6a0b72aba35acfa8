"""Fixtures that several test files share: a disk that fills up."""
import subprocess

import pytest


def mount(*args):
    """mount(8) with these arguments; False where this sandbox or user may not mount."""
    try:
        return subprocess.run(["mount", *args], capture_output=True, timeout=30).returncode == 0
    except OSError:  # no mount(8)
        return False


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 1 MiB tmpfs of its own, a disk that a few MB fill; skipped where mounting is not allowed."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if not mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)):
        pytest.skip("mounting a tmpfs is not allowed here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)
