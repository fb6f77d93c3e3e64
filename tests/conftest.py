"""Shared test setup. Run the suite from the repository root with `python -m pytest -q tests`
(`python -m` puts the root on the import path, so `import dit4dit` works without path edits)."""
import os

import pytest

# MuJoCo renders offscreen through EGL (Mesa on a CPU-only machine); must be set before mujoco is imported.
os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture
def damaged_copies(tmp_path):
    """damaged_copies(path) -> (truncated, garbage): in tmp_path, a copy of the file at path cut
    in half and a file of plain text, both with path's suffix: what a loader must reject with an
    error naming the file."""
    def make(path):
        truncated, garbage = tmp_path / f"truncated{path.suffix}", tmp_path / f"garbage{path.suffix}"
        data = path.read_bytes()
        truncated.write_bytes(data[: len(data) // 2])
        garbage.write_text("not a dit4dit file at all")
        return truncated, garbage
    return make
