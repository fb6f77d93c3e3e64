"""dit4dit's own episode files: one compressed .npz per episode, written atomically by
save_episode and read back, checked, by load_episode (a wrong or truncated file names itself).

  frames       uint8   (T+1, H, W, 3)  frames[t] is the observation before action[t];
                                       frames[T] the one after the last action
  state        float32 (T+1, P)        proprioceptive state at the same instants
  action       float32 (T, A)          the expert's command at step t, in [-1, 1] (executed as is,
                                       or with noise added: collect_episode's `noise`)
  instruction  str, task str, seed int64, success bool  (0-d arrays)
"""
import os
import zipfile
import zlib

import numpy as np

from bridges.files import atomic_write

EPISODE_KEYS = ("frames", "state", "action", "instruction", "task", "seed", "success")


def save_episode(path, episode):
    """Write `episode` (dict with EPISODE_KEYS) to `path` atomically (atomic_write)."""
    path = os.fspath(path)
    missing = [k for k in EPISODE_KEYS if k not in episode]
    if missing:
        raise ValueError(f"episode for {path}: missing keys {missing}")
    arrays = {
        "frames": np.asarray(episode["frames"], dtype=np.uint8),
        "state": np.asarray(episode["state"], dtype=np.float32),
        "action": np.asarray(episode["action"], dtype=np.float32),
        "instruction": np.asarray(str(episode["instruction"])),
        "task": np.asarray(str(episode["task"])),
        "seed": np.asarray(int(episode["seed"]), dtype=np.int64),
        "success": np.asarray(bool(episode["success"])),
    }
    _check_episode(path, arrays)
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def load_episode(path):
    """Read an episode written by save_episode. FileNotFoundError if `path` does not exist;
    ValueError naming the file if it is truncated, corrupt or not an episode."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"episode file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in EPISODE_KEYS if k not in npz.files]
            if missing:
                raise ValueError(f"missing keys {missing}")
            arrays = {k: npz[k] for k in EPISODE_KEYS}  # reading decompresses: truncation shows here
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        raise ValueError(f"episode file {path} is truncated or not an episode: {err}") from err
    _check_episode(path, arrays)
    return {
        "frames": arrays["frames"], "state": arrays["state"], "action": arrays["action"],
        "instruction": str(arrays["instruction"]), "task": str(arrays["task"]),
        "seed": int(arrays["seed"]), "success": bool(arrays["success"]),
    }


def _check_episode(path, a):
    f, s, act = a["frames"], a["state"], a["action"]
    if f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3:
        raise ValueError(f"episode file {path}: frames must be uint8 (T+1, H, W, 3), got {f.dtype} {f.shape}")
    if s.ndim != 2 or act.ndim != 2:
        raise ValueError(f"episode file {path}: state and action must be 2-D, got {s.shape} and {act.shape}")
    if not (len(f) == len(s) == len(act) + 1):
        raise ValueError(f"episode file {path}: expected T+1 frames and states for T actions, got "
                         f"{len(f)} frames, {len(s)} states, {len(act)} actions")
