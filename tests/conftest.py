"""Shared test setup. Run the suite from the repository root with `python -m pytest -q tests`
(`python -m` puts the root on the import path, so `import dit4dit` works without path edits)."""
import os

# MuJoCo renders offscreen through EGL (Mesa on a CPU-only machine); must be set before mujoco is imported.
os.environ.setdefault("MUJOCO_GL", "egl")
