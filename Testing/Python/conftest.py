"""Shared fixtures: a small synthetic phantom cohort and a tiny untrained model bundle.

Nothing here needs ../shared: the real BraTS cases are only used by tests marked with the
``brats_dir`` fixture, which skip when the data is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BRATS_DIR = REPO.parent / "shared" / "data" / "brats18"


@pytest.fixture(scope="session")
def phantom_cohort(tmp_path_factory) -> Path:
    """Four 48^3 phantom cases with all four modalities and labels (BraTS 2018 naming)."""
    from bigl.data.phantoms import write_cohort

    out = tmp_path_factory.mktemp("phantoms")
    write_cohort(out, cases=4, size=48, seed=0, modalities=("t1", "t1ce", "t2", "flair"))
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """An untrained but complete bundle (segmenter + both translators) small enough for CPU tests."""
    from bigl.testing import make_test_bundle

    return make_test_bundle(tmp_path_factory.mktemp("bundle") / "tiny.safetensors")


@pytest.fixture(scope="session")
def brats_dir() -> Path:
    """The real BraTS 2018 cases beside the repository; tests using it skip when absent."""
    if not BRATS_DIR.is_dir():
        pytest.skip(f"real BraTS data not found at {BRATS_DIR} (optional; only for data checks)")
    return BRATS_DIR


def _mount_tmpfs(folder: Path, options: str) -> bool:
    import shutil
    import subprocess

    if shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def _unmount(folder: Path) -> None:
    import subprocess

    subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.fixture()
def read_only_folder(tmp_path) -> Path:
    """A small folder nothing can be written in: a read-only 1 MB tmpfs when the tests run as root
    (root ignores permission bits), else a folder of mode 0555. Skips where neither works."""
    import os

    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    elif _mount_tmpfs(folder, "ro,size=1m"):
        yield folder
        _unmount(folder)
    else:
        pytest.skip("cannot make a read-only folder here (root without the right to mount)")


@pytest.fixture()
def full_disk(tmp_path) -> Path:
    """A writable folder on a 256 kB tmpfs, which a model bundle or a scan fills (root only; skips otherwise)."""
    import os

    folder = tmp_path / "full"
    folder.mkdir()
    if os.geteuid() != 0 or not _mount_tmpfs(folder, "size=256k"):
        pytest.skip("cannot mount a small file system here (needs root)")
    yield folder
    _unmount(folder)
