"""Shared test setup. Run the suite from the repository root with `python -m pytest -q tests`
(`python -m` puts the root on the import path, so `import dit4dit` works without path edits)."""
import os
import zipfile

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


@pytest.fixture
def flipped_copy(tmp_path):
    """flipped_copy(path) -> a copy of the torch checkpoint at path, in tmp_path, with one byte
    inverted in the middle of its largest stored tensor: the zip and the pickle stay readable (torch
    does not check the zip's CRC), only the numbers change, as a bad disk or copy would."""
    def make(path):
        data = bytearray(path.read_bytes())
        with zipfile.ZipFile(path) as zf:
            info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        local = info.header_offset
        name_len = int.from_bytes(data[local + 26:local + 28], "little")
        extra_len = int.from_bytes(data[local + 28:local + 30], "little")
        data[local + 30 + name_len + extra_len + info.file_size // 2] ^= 0xFF
        flipped = tmp_path / f"flipped{path.suffix}"
        flipped.write_bytes(bytes(data))
        return flipped
    return make
