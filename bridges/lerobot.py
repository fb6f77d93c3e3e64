"""LeRobot datasets <-> dit4dit: a reader for LeRobot v2.0/v2.1/v3.0 datasets (episodes, lerobot-style
samples, normalization statistics) and a writer of LeRobot v3.0 from dit4dit's episode dicts.

Optional dependencies, imported lazily: pyarrow (parquet) and av (PyAV: its wheel carries FFmpeg
with the dav1d AV1 decoder and the SVT-AV1 encoder). `pip install -e .[data]` installs them.

The format (what this module reads and writes)
----------------------------------------------
A LeRobot dataset is a folder. Every version has
  meta/info.json        codebase_version, fps, features {name: {dtype, shape, names, info}},
                        data_path and video_path templates, chunks_size, total_* counts
  data/...parquet       one row per frame: observation.state, action, timestamp (s, from the
                        episode's start), frame_index (0.. within the episode), episode_index,
                        index (0.. over the dataset), task_index; a camera stored as `image` is a
                        column of PNG bytes ({bytes, path}), one stored as `video` lives in mp4 files
v3.0:
  meta/episodes/chunk-*/file-*.parquet   one row per episode: tasks, length, data/chunk_index,
                        data/file_index, dataset_from_index/to_index, and per camera
                        videos/<key>/chunk_index, file_index, from_timestamp, to_timestamp, and
                        per-episode stats/<feature>/<stat>
  meta/tasks.parquet    task_index, task (the task string is the pandas index)
  meta/stats.json       {feature: {min, max, mean, std, count, q01..q99}} over the whole dataset
  data/chunk-{c:03d}/file-{f:03d}.parquet        shared by many episodes
  videos/<key>/chunk-{c:03d}/file-{f:03d}.mp4    shared by many episodes: an episode's frame at
                        row timestamp t is the video frame at from_timestamp + t
v2.0 / v2.1: one parquet and one mp4 per episode, chunk = episode_index // chunks_size:
  data/chunk-000/episode_000000.parquet, videos/chunk-000/<key>/episode_000000.mp4 (starting at 0)
  meta/episodes.jsonl ({episode_index, tasks, length}), meta/tasks.jsonl ({task_index, task}),
  meta/stats.json (v2.0) or meta/episodes_stats.jsonl (v2.1: per-episode stats, aggregated here
  the way lerobot aggregates them).
lerobot writes video as AV1, yuv420p, a keyframe every 2 frames (GOP 2); stats use the population
std, and image stats have shape (3, 1, 1) on 0..1.

An episode, as dit4dit's training consumes it (LeRobotEpisodes.episode)
-----------------------------------------------------------------------
  frames  uint8 (T, S, S, 3)  the selected cameras through bridges.frames.model_frames
  state   float32 (T, P), action float32 (T, A), timestamp float32 (T,)
  instruction  str (LeRobot's task string); task  str (the suite's task name, "push", in a
               dataset write_lerobot_v3 wrote, which training balances over; else the instruction)
  episode_index int, fps int, path str (the data file and episode, for error messages)
In LeRobot every row is one frame with its own state and action, so an episode has T frames for T
actions; dit4dit's .npz episodes also keep the frame after the last action (T+1 frames and states).
The indexing is the same (frames[t] and state[t] are what the policy saw before action[t]); a
LeRobot episode only lacks that final frame, so a future frame past row T-1 is padding.

A sample (sample(), LeRobotSamples), lerobot's delta-index convention
--------------------------------------------------------------------
For row t of an episode: frames at t + frame_offsets (default: t, t+s, ..., t+F*s with stride
s = K/F, docs/design.md §3.1; the authors' LIBERO release: offsets 0, 2, 4, 6, 8), actions at t .. t+K-1,
state at t, the instruction. An index outside the episode is clamped to the episode's own first or
last row (never a neighbour's) and marked in `frames_is_pad` / `action_is_pad`, like lerobot's
`<key>_is_pad`; `action_mask` (K, A) is 0 on padded steps, the mask dit4dit's action loss reads.
"""
import io
import json
import os
import shutil
import uuid
import warnings
from collections import OrderedDict
from fractions import Fraction
from glob import glob

import numpy as np
import torch

from bridges.files import read_jsonl
from bridges.frames import model_frames
from bridges.normalizer import Normalizer

INSTALL_HINT = "pip install -e .[data]"
VERSIONS = ("v2.0", "v2.1", "v3.0")
STATE_KEY, ACTION_KEY = "observation.state", "action"
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)                   # lerobot's q01, q10, q50, q90, q99
TIMESTAMP_TOLERANCE_S = 1e-4                                 # lerobot's default tolerance_s
CHUNKS_SIZE = 1000
DATA_PATH_V3 = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH_V3 = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
INDEX_FEATURES = ("timestamp", "frame_index", "episode_index", "index", "task_index")


def _require():
    """(pyarrow, pyarrow.parquet, av), or ModuleNotFoundError naming the install command."""
    try:
        import av
        import pyarrow
        import pyarrow.parquet
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"LeRobot datasets need the optional package {err.name!r}: {INSTALL_HINT}",
                                  name=err.name) from err
    return pyarrow, pyarrow.parquet, av


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def _read_parquet(path, columns=None, what="file"):
    pa, pq, _ = _require()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the {what} is missing")
    try:
        present = set(pq.read_schema(path).names)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"{path}: cannot read the {what} (truncated or not parquet): {err}") from None
    missing = [c for c in columns or () if c not in present]
    if missing:
        raise ValueError(f"{path}: field(s) {missing} missing from the {what}")
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"{path}: cannot read the {what} (truncated or not parquet): {err}") from None


def _matrix(table, name, path):
    """A list / fixed-size-list column -> float32 (rows, D); a scalar column -> (rows,)."""
    pa, _, _ = _require()
    col = table.column(name).combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
        values = np.array(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)  # a writable copy
        if len(col) and values.size % len(col):
            raise ValueError(f"{path}: column {name!r} has rows of different lengths")
        return values.reshape(len(col), -1)
    return np.array(col.to_numpy(zero_copy_only=False))


def _feature_hw(feature):
    """(H, W) of an image/video feature, whether its shape is listed HWC or CHW."""
    shape, names = list(feature["shape"]), feature.get("names") or []
    if len(names) == 3 and names[0] in ("channel", "channels"):
        return int(shape[1]), int(shape[2])
    return int(shape[0]), int(shape[1])


# ----------------------------------------------------------------------------------------------
# Statistics: lerobot's per-episode stats and their aggregation

def _stats_of(x):
    """{min, max, mean, std, count, q..} of float64 (N, D) over N (std: population)."""
    qs = np.quantile(x, QUANTILES, axis=0)
    out = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0), "count": np.array([len(x)])}
    out.update({f"q{round(q * 100):02d}": v for q, v in zip(QUANTILES, qs)})
    return out


def _image_stats(frames):
    """lerobot's image stats of uint8 (N, H, W, 3) frames on 0..1, each of shape (3, 1, 1).
    Exact over every pixel of every frame (from per-channel histograms of the 256 levels), where
    lerobot samples and downsamples frames of long episodes."""
    levels = np.arange(256, dtype=np.float64) / 255
    hist = np.stack([np.bincount(frames[..., c].ravel(), minlength=256) for c in range(3)]).astype(np.float64)
    n = hist.sum(1)                                                         # (3,)
    mean = hist @ levels / n
    std = np.sqrt(np.maximum(hist @ levels ** 2 / n - mean ** 2, 0))
    cum = np.cumsum(hist, axis=1)                                           # (3, 256)

    def order_stat(k):  # the k-th smallest value (0-based) of each channel
        return np.array([levels[np.searchsorted(cum[c], k[c], side="right")] for c in range(3)])

    out = {"min": order_stat(np.zeros(3)), "max": order_stat(n - 1), "mean": mean, "std": std,
           "count": np.array([len(frames)])}
    for q in QUANTILES:  # numpy's default ("linear") quantile between order statistics
        h = (n - 1) * q
        lo, hi = order_stat(np.floor(h)), order_stat(np.minimum(np.floor(h) + 1, n - 1))
        out[f"q{round(q * 100):02d}"] = lo + (h - np.floor(h)) * (hi - lo)
    return {k: (v if k == "count" else v.reshape(3, 1, 1)) for k, v in out.items()}


def aggregate_stats(per_episode):
    """lerobot's aggregation of a list of per-episode {feature: {stat: array}}: min of mins, max of
    maxes, count-weighted mean, pooled population variance, summed count, count-weighted quantiles."""
    out = {}
    for key in per_episode[0]:
        eps = [s[key] for s in per_episode if key in s]
        counts = np.array([float(np.asarray(s["count"]).reshape(-1)[0]) for s in eps])
        w = counts / counts.sum()
        w = w.reshape(-1, *([1] * np.asarray(eps[0]["mean"]).ndim))
        means = np.stack([np.asarray(s["mean"], dtype=np.float64) for s in eps])
        mean = (w * means).sum(0)
        var = (w * (np.stack([np.asarray(s["std"], dtype=np.float64) for s in eps]) ** 2
                    + (means - mean) ** 2)).sum(0)
        agg = {"min": np.min([s["min"] for s in eps], axis=0), "max": np.max([s["max"] for s in eps], axis=0),
               "mean": mean, "std": np.sqrt(var), "count": np.array([int(counts.sum())])}
        for q in eps[0]:
            if q.startswith("q") and all(q in s for s in eps):
                agg[q] = (w * np.stack([np.asarray(s[q], dtype=np.float64) for s in eps])).sum(0)
        out[key] = agg
    return out


def _as_arrays(stats):
    return {k: {s: np.asarray(v, dtype=np.int64 if s == "count" else np.float64) for s, v in d.items()}
            for k, d in stats.items()}


def _as_lists(stats):
    return {k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in stats.items()}


def normalizer_from_stats(stats, key):
    """Normalizer(low, high) (bridges.normalizer: min-max to [-1, 1]) from a feature's min/max; a
    constant dimension is widened by 1 on each side, as Normalizer.fit does."""
    if key not in stats or "min" not in stats[key] or "max" not in stats[key]:
        raise ValueError(f"stats: no min/max for {key!r} (stats hold {sorted(stats)})")
    low, high = np.asarray(stats[key]["min"], np.float32), np.asarray(stats[key]["max"], np.float32)
    flat = high - low < 1e-6
    return Normalizer(np.where(flat, low - 1, low), np.where(flat, high + 1, high))


# ----------------------------------------------------------------------------------------------
# Reading

class LeRobotEpisodes:
    """A LeRobot v2.0 / v2.1 / v3.0 dataset at `root`, episode by episode.

    cameras: feature names tiled left to right (default: the first image/video feature, the
    primary camera); image_size: the model frame's side S (default: the first camera's height).
    States, actions and timestamps of every episode are read at construction (small); frames are
    decoded when an episode is first asked for, sequentially through the episode (one seek per
    episode and camera), resized by model_frames and kept in memory as uint8 while the cache
    holds less than cache_bytes (least recently used episodes are dropped beyond that).
    decode_threads: FFmpeg decoder threads per video (1: parallelism comes from DataLoader workers).
    """

    def __init__(self, root, cameras=None, image_size=None, state_key=STATE_KEY, action_key=ACTION_KEY,
                 cache_bytes=2 << 30, decode_threads=1):
        _require()
        self.root = os.fspath(root)
        self.info_path = os.path.join(self.root, "meta", "info.json")
        if not os.path.isfile(self.info_path):
            raise FileNotFoundError(f"{self.root}: not a LeRobot dataset: {self.info_path} is missing")
        self.info = _read_json(self.info_path)
        self.version = self.info.get("codebase_version")
        if self.version not in VERSIONS:
            raise ValueError(f"{self.info_path}: codebase_version {self.version!r} is not supported "
                             f"(this reader knows {', '.join(VERSIONS)})")
        for field in ("fps", "features", "data_path"):
            if field not in self.info:
                raise ValueError(f"{self.info_path}: field {field!r} is missing")
        self.fps = self.info["fps"]
        self.features = self.info["features"]
        self.camera_keys = [k for k, f in self.features.items() if f.get("dtype") in ("video", "image")]
        if cameras is None:
            if not self.camera_keys:
                raise ValueError(f"{self.info_path}: 'features' has no camera (no feature of dtype video or image)")
            cameras = self.camera_keys[:1]
        self.cameras = [cameras] if isinstance(cameras, str) else list(cameras)
        for key, role in [(state_key, "the state"), (action_key, "the action")] + [(c, "a camera") for c in self.cameras]:
            if key not in self.features:
                raise ValueError(f"{self.info_path}: feature {key!r} ({role} the model needs) is missing from "
                                 f"'features' (the dataset has {sorted(self.features)})")
        for c in self.cameras:
            if c not in self.camera_keys:
                raise ValueError(f"{self.info_path}: feature {c!r} is not a camera (dtype "
                                 f"{self.features[c].get('dtype')!r}); cameras: {self.camera_keys}")
        self.state_key, self.action_key = state_key, action_key
        self.image_size = int(image_size or _feature_hw(self.features[self.cameras[0]])[0])
        if self.image_size % len(self.cameras):
            raise ValueError(f"image_size={self.image_size} is not divisible by the {len(self.cameras)} tiled cameras")
        self.cache_bytes, self.decode_threads = cache_bytes, decode_threads
        self._cache, self._cached_bytes, self._png_table = OrderedDict(), 0, (None, None)
        if self.version == "v3.0":
            self._read_v3()
        else:
            self._read_v2()
        self._read_rows()
        for ep in self.meta:  # a missing video shows now, not in the middle of training
            for key, (path, _) in ep["videos"].items():
                if key in self.cameras and not os.path.isfile(path):
                    raise FileNotFoundError(f"{path}: the video of camera {key!r} for episode "
                                            f"{ep['episode_index']} is missing")

    # --- metadata
    def _video_features(self):
        return [k for k in self.camera_keys if self.features[k]["dtype"] == "video"]

    def _read_v3(self):
        meta = os.path.join(self.root, "meta")
        tasks = _read_parquet(os.path.join(meta, "tasks.parquet"), what="task table").to_pydict()
        if "task" not in tasks or "task_index" not in tasks:
            raise ValueError(f"{os.path.join(meta, 'tasks.parquet')}: needs columns 'task_index' and 'task'")
        self.tasks = dict(zip(tasks["task_index"], tasks["task"]))
        files = sorted(glob(os.path.join(meta, "episodes", "chunk-*", "file-*.parquet")))
        if not files:
            raise FileNotFoundError(f"{os.path.join(meta, 'episodes')}: no episode metadata (chunk-*/file-*.parquet)")
        _, pq, _ = _require()
        rows = []
        for path in files:
            names = [n for n in pq.read_schema(path).names if not n.startswith("stats/")]
            rows += _read_parquet(path, names, "episode metadata").to_pylist()
        rows.sort(key=lambda r: r["episode_index"])
        video_path = self.info.get("video_path")
        self.meta = []
        for r in rows:
            ep = {"episode_index": int(r["episode_index"]), "length": int(r["length"]), "tasks": list(r["tasks"]),
                  "suite_task": r.get("dit4dit/task"),  # written by write_lerobot_v3 (the suite's task name)
                  "data_file": os.path.join(self.root, self.info["data_path"].format(
                      chunk_index=r["data/chunk_index"], file_index=r["data/file_index"])), "videos": {}}
            for key in self._video_features():
                prefix = f"videos/{key}/"
                if prefix + "from_timestamp" not in r:
                    raise ValueError(f"{files[0]}: column {prefix + 'from_timestamp'!r} missing for camera {key!r}")
                ep["videos"][key] = (os.path.join(self.root, video_path.format(
                    video_key=key, chunk_index=r[prefix + "chunk_index"], file_index=r[prefix + "file_index"])),
                    float(r[prefix + "from_timestamp"]))
            self.meta.append(ep)
        stats_path = os.path.join(meta, "stats.json")
        self.stats = _as_arrays(_read_json(stats_path)) if os.path.isfile(stats_path) else {}

    def _read_v2(self):
        meta = os.path.join(self.root, "meta")
        self.tasks = {int(r["task_index"]): r["task"] for r in read_jsonl(os.path.join(meta, "tasks.jsonl"))}
        chunks = int(self.info.get("chunks_size", CHUNKS_SIZE))
        self.meta = []
        for r in sorted(read_jsonl(os.path.join(meta, "episodes.jsonl")), key=lambda r: r["episode_index"]):
            i = int(r["episode_index"])
            ep = {"episode_index": i, "length": int(r["length"]), "tasks": list(r["tasks"]), "videos": {},
                  "data_file": os.path.join(self.root, self.info["data_path"].format(
                      episode_chunk=i // chunks, episode_index=i))}
            for key in self._video_features():
                ep["videos"][key] = (os.path.join(self.root, self.info["video_path"].format(
                    episode_chunk=i // chunks, video_key=key, episode_index=i)), 0.0)
            self.meta.append(ep)
        stats_path, per_episode = os.path.join(meta, "stats.json"), os.path.join(meta, "episodes_stats.jsonl")
        if os.path.isfile(stats_path):
            self.stats = _as_arrays(_read_json(stats_path))
        elif os.path.isfile(per_episode):
            self.stats = aggregate_stats([_as_arrays(r["stats"]) for r in read_jsonl(per_episode)])
        else:
            self.stats = {}

    def _read_rows(self):
        """Per episode: state, action, timestamp, task_index, and its rows in its data file."""
        columns = [self.state_key, self.action_key, "timestamp", "frame_index", "episode_index", "task_index"]
        tables = {}
        for ep in self.meta:
            path = ep["data_file"]
            if path not in tables:
                table = _read_parquet(path, columns, "data file")
                tables[path] = {c: _matrix(table, c, path) for c in columns}
            t = tables[path]
            rows = np.flatnonzero(t["episode_index"] == ep["episode_index"])
            if len(rows) != ep["length"] or (len(rows) and rows[-1] - rows[0] + 1 != len(rows)):
                raise ValueError(f"{path}: episode {ep['episode_index']} has {len(rows)} rows (contiguous: "
                                 f"{len(rows) and rows[-1] - rows[0] + 1 == len(rows)}), but the episode "
                                 f"metadata says length {ep['length']}")
            if ep["length"] == 0:
                raise ValueError(f"{path}: episode {ep['episode_index']} has no frames")
            sl = slice(int(rows[0]), int(rows[-1]) + 1)
            if not np.array_equal(t["frame_index"][sl], np.arange(ep["length"])):
                raise ValueError(f"{path}: field 'frame_index' of episode {ep['episode_index']} "
                                 f"is not 0..{ep['length'] - 1}")
            for key, name in ((self.state_key, "state"), (self.action_key, "action")):
                want = int(np.prod(self.features[key]["shape"]))
                if t[key].ndim != 2 or t[key].shape[1] != want:
                    raise ValueError(f"{path}: field {key!r} has shape {t[key].shape[1:]}, "
                                     f"but meta/info.json says {self.features[key]['shape']}")
            unknown = sorted(set(t["task_index"][sl].tolist()) - set(self.tasks))
            if unknown:
                raise ValueError(f"{path}: field 'task_index' of episode {ep['episode_index']} has {unknown}, "
                                 f"which the task table (meta/tasks.*) does not list")
            ep.update(rows=sl, state=t[self.state_key][sl], action=t[self.action_key][sl],
                      timestamp=t["timestamp"][sl].astype(np.float64), task_index=t["task_index"][sl])

    # --- per episode
    def __len__(self):
        return len(self.meta)

    @property
    def lengths(self):
        return [ep["length"] for ep in self.meta]

    def _episode(self, i):
        if not isinstance(i, (int, np.integer)) or not 0 <= i < len(self.meta):
            raise IndexError(f"{self.root}: episode {i!r} is out of range: the dataset has {len(self.meta)} "
                             f"episodes (0..{len(self.meta) - 1})")
        return self.meta[int(i)]

    def instruction(self, i, t=0):
        """The task string of row t of episode i."""
        ep = self._episode(i)
        return self.tasks[int(ep["task_index"][t])]

    def camera_frames(self, i, key):
        """uint8 (T, H, W, 3) of one camera for episode i, at the stored resolution."""
        ep = self._episode(i)
        if self.features[key]["dtype"] == "video":
            path, start = ep["videos"][key]
            return _decode_video(path, start + ep["timestamp"], self.decode_threads,
                                 f"camera {key!r}, episode {ep['episode_index']}")
        return self._png_frames(ep, key)

    def _png_frames(self, ep, key):
        from PIL import Image
        path = ep["data_file"]
        if self._png_table[0] != (path, key):  # episodes of one file are read in a row: keep its column
            self._png_table = ((path, key), _read_parquet(path, [key], "data file").column(key).combine_chunks())
        col = self._png_table[1].slice(ep["rows"].start, ep["length"])
        frames = []
        for n, cell in enumerate(col.to_pylist()):
            data = cell.get("bytes") if isinstance(cell, dict) else cell
            if data is None and isinstance(cell, dict) and cell.get("path"):
                with open(os.path.join(self.root, cell["path"]), "rb") as f:
                    data = f.read()
            try:
                frames.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            except Exception as err:
                raise ValueError(f"{path}: field {key!r}, episode {ep['episode_index']} frame {n}: "
                                 f"not a readable image ({err})") from None
        return np.stack(frames)

    def frames(self, i):
        """uint8 (T, S, S, 3): the selected cameras of episode i as model frames (cached)."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        out = model_frames([self.camera_frames(i, key) for key in self.cameras], self.image_size)
        if out.nbytes <= self.cache_bytes:
            self._cache[i] = out
            self._cached_bytes += out.nbytes
            while self._cached_bytes > self.cache_bytes:
                self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return out

    def episode(self, i):
        """Episode i as the dict dit4dit's training consumes (see the module docstring)."""
        ep = self._episode(i)
        instruction = self.instruction(i)
        return {"frames": self.frames(i), "state": ep["state"], "action": ep["action"],
                "timestamp": ep["timestamp"].astype(np.float32), "instruction": instruction,
                "task": ep.get("suite_task") or instruction,
                "episode_index": ep["episode_index"], "fps": self.fps,
                "path": f"{ep['data_file']} (episode {ep['episode_index']})"}

    def episodes(self, progress=False):
        """Every episode (episode(i) for i in order), decoded once."""
        from tqdm import tqdm
        return [self.episode(i) for i in tqdm(range(len(self)), desc="episodes", unit="ep", disable=not progress)]

    def normalizers(self):
        """(state, action) Normalizer from the dataset's own stats (min/max)."""
        where = f"{self.root}: meta/stats.json"
        if not self.stats:
            raise ValueError(f"{where} (or meta/episodes_stats.jsonl) is missing: no statistics to normalize with")
        try:
            return normalizer_from_stats(self.stats, self.state_key), normalizer_from_stats(self.stats, self.action_key)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    def summary(self):
        """A printable summary: version, fps, episodes, frames, tasks, features."""
        lengths = self.lengths
        per_task = {}
        for ep in self.meta:
            for task in ep["tasks"]:
                per_task[task] = per_task.get(task, 0) + 1
        lines = [f"LeRobot dataset {self.root}",
                 f"  codebase_version {self.version}, {self.fps} fps, robot {self.info.get('robot_type')}",
                 f"  {len(lengths)} episodes, {sum(lengths)} frames (per episode: min {min(lengths)}, "
                 f"mean {np.mean(lengths):.1f}, max {max(lengths)})",
                 f"  {len(self.tasks)} tasks:"]
        lines += [f"    {i:>3}  {task!r}  ({per_task.get(task, 0)} episodes)" for i, task in sorted(self.tasks.items())]
        lines.append("  features:")
        for key, f in self.features.items():
            extra = ""
            if f.get("dtype") == "video":
                vi = f.get("info") or {}
                extra = f"  {vi.get('video.codec')} {vi.get('video.pix_fmt')}"
            role = {self.state_key: "  <- state", self.action_key: "  <- action"}.get(key, "")
            if key in self.cameras:
                role = f"  <- camera {self.cameras.index(key)} (model frames {self.image_size}x{self.image_size})"
            lines.append(f"    {key:<34} {f.get('dtype'):<8} {tuple(f.get('shape', ()))}{extra}{role}")
        lines.append(f"  stats: {', '.join(sorted(self.stats)) or 'none'}")
        return "\n".join(lines)


def _decode_video(path, timestamps, threads, what):
    """uint8 (N, H, W, 3) RGB: the frames of the video at `path` at the given times (s), decoded in
    one pass from the keyframe before the first. ValueError naming the file when it cannot be
    decoded or has no frame within TIMESTAMP_TOLERANCE_S of a wanted time."""
    _, _, av = _require()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the video of {what} is missing")
    tol = TIMESTAMP_TOLERANCE_S
    out, n, last = None, 0, None
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream ({what})")
            stream = container.streams.video[0]
            stream.codec_context.thread_count = threads
            if timestamps[0] > tol:
                container.seek(int(max(timestamps[0] - tol, 0) / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                t = float(frame.pts * stream.time_base)
                last = t
                if t < timestamps[n] - tol:
                    continue
                if t > timestamps[n] + tol:
                    raise ValueError(f"{path}: {what} needs a frame at {timestamps[n]:.4f} s (from_timestamp + "
                                     f"field 'timestamp' of row {n}), but the video's next frame is at {t:.4f} s: "
                                     f"the timestamps do not match the video")
                img = frame.to_ndarray(format="rgb24")
                if out is None:
                    out = np.empty((len(timestamps), *img.shape), np.uint8)
                out[n] = img
                n += 1
                if n == len(timestamps):
                    break
    except av.FFmpegError as err:
        raise ValueError(f"{path}: cannot decode the video of {what} (truncated or corrupt): {err}") from None
    if n < len(timestamps):
        ends = "has no frames" if last is None else f"ends at {last:.4f} s"
        raise ValueError(f"{path}: {what} needs frames up to {timestamps[-1]:.4f} s (from_timestamp + field "
                         f"'timestamp'), but the video {ends}: truncated, or timestamps that do not match the video")
    return out


# ----------------------------------------------------------------------------------------------
# Samples in lerobot's delta-index convention

def default_frame_offsets(num_future_frames, action_horizon):
    """(0, s, 2s, ..., F*s) with s = K/F: the current frame and F future frames spanning the chunk."""
    F, K = num_future_frames, action_horizon
    if F < 1 or K < 1 or K % F:
        raise ValueError(f"action_horizon K={K} must be a positive multiple of num_future_frames F={F}")
    return tuple(range(0, K + 1, K // F))


def sample(frames, state, action, t, frame_offsets, action_horizon):
    """One sample at row t of an episode (numpy arrays with one row per frame): frames at
    t + frame_offsets, actions t .. t+K-1, state t. Indices outside [0, T) are clamped to the
    episode's own edge row and marked True in frames_is_pad / action_is_pad."""
    T = len(action)
    if not 0 <= t < T:
        raise IndexError(f"row {t} is outside the episode's {T} rows")
    fi = t + np.asarray(frame_offsets)
    ai = t + np.arange(action_horizon)
    frames_is_pad, action_is_pad = (fi < 0) | (fi >= T), ai >= T
    return {"frames": frames[np.clip(fi, 0, T - 1)], "frames_is_pad": frames_is_pad,
            "state": state[t], "actions": action[np.minimum(ai, T - 1)], "action_is_pad": action_is_pad}


class LeRobotSamples(torch.utils.data.Dataset):
    """Every row of every episode of a LeRobotEpisodes is one sample, for a torch DataLoader:
    frames uint8 (1+F, S, S, 3) (or len(frame_offsets)), frames_is_pad bool, state float32 (P,),
    actions float32 (K, A), action_is_pad bool (K,), action_mask float32 (K, A) (0 on padded steps),
    instruction str, episode_index, t. State and actions are normalized when normalizers are
    given (dataset.normalizers() gives the dataset's own). Each DataLoader worker decodes and
    caches the episodes it meets."""

    def __init__(self, episodes, num_future_frames=4, action_horizon=8, frame_offsets=None,
                 state_normalizer=None, action_normalizer=None):
        self.episodes, self.action_horizon = episodes, action_horizon
        self.frame_offsets = tuple(frame_offsets) if frame_offsets is not None else \
            default_frame_offsets(num_future_frames, action_horizon)
        self.state_normalizer, self.action_normalizer = state_normalizer, action_normalizer
        self.starts = np.cumsum([0] + episodes.lengths)

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is out of range [0, {len(self)})")
        i = int(np.searchsorted(self.starts, index, side="right") - 1)
        t = int(index - self.starts[i])
        ep = self.episodes.meta[i]
        s = sample(self.episodes.frames(i), ep["state"], ep["action"], t, self.frame_offsets, self.action_horizon)
        state, actions = torch.from_numpy(s["state"].copy()), torch.from_numpy(s["actions"])
        if self.state_normalizer is not None:
            state = self.state_normalizer.normalize(state)
        if self.action_normalizer is not None:
            actions = self.action_normalizer.normalize(actions)
        action_is_pad = torch.from_numpy(s["action_is_pad"])
        return {"frames": torch.from_numpy(s["frames"]), "frames_is_pad": torch.from_numpy(s["frames_is_pad"]),
                "state": state, "actions": actions, "action_is_pad": action_is_pad,
                "action_mask": (~action_is_pad)[:, None].expand_as(actions).float(),
                "instruction": self.episodes.instruction(i, t), "episode_index": ep["episode_index"], "t": t}


def inspect(path):
    """A printable summary of the LeRobot dataset at `path` (nothing is decoded)."""
    return LeRobotEpisodes(path).summary()


# ----------------------------------------------------------------------------------------------
# Writing LeRobot v3.0

ENCODERS = {"libsvtav1": "av1", "libaom-av1": "av1", "libx264": "h264", "mpeg4": "mpeg4"}  # FFmpeg name -> codec


def _pick_encoder(av, codec):
    """(FFmpeg encoder, codec name for info.json): `codec`, or the first of ENCODERS this FFmpeg has."""
    if codec not in ENCODERS:
        raise ValueError(f"write_lerobot_v3: codec {codec!r} is not one of {sorted(ENCODERS)}")
    if codec in av.codecs_available:
        return codec, ENCODERS[codec]
    for fallback, name in ENCODERS.items():
        if fallback in av.codecs_available:
            warnings.warn(f"write_lerobot_v3: the {codec} encoder is not in this FFmpeg build; writing {name} with "
                          f"{fallback} instead (lerobot reads it, but its own datasets are AV1)")
            return fallback, name
    raise RuntimeError(f"write_lerobot_v3: none of the encoders {sorted(ENCODERS)} is in PyAV's FFmpeg build")


def _hf_features(P, A):
    """The `huggingface` schema metadata of a data file (what the `datasets` library reads)."""
    def vector(n):
        return {"feature": {"dtype": "float32", "_type": "Value"}, "length": n, "_type": "List"}
    scalar = {k: {"dtype": "float32" if k == "timestamp" else "int64", "_type": "Value"} for k in INDEX_FEATURES}
    return json.dumps({"info": {"features": {STATE_KEY: vector(P), ACTION_KEY: vector(A), **scalar}}})


def _pandas_task_index():
    """The `pandas` schema metadata of meta/tasks.parquet: the task string is the DataFrame's index."""
    def col(name, kind):
        return {"name": name, "field_name": name, "pandas_type": kind,
                "numpy_type": "int64" if kind == "int64" else "object", "metadata": None}
    return json.dumps({"index_columns": ["task"], "column_indexes": [{"name": None, "field_name": None,
                       "pandas_type": "unicode", "numpy_type": "object", "metadata": {"encoding": "UTF-8"}}],
                       "columns": [col("task_index", "int64"), col("task", "unicode")], "attributes": {},
                       "creator": {"library": "pyarrow", "version": "dit4dit"}, "pandas_version": "2.3.3"})


class LeRobotWriter:
    """Writes a LeRobot v3.0 dataset at `path` one episode at a time, so that memory holds one episode:
    add(episode) appends it (its rows to the data, its frames to each camera's one AV1 mp4, yuv420p, GOP
    2, lerobot's defaults; its stats as lerobot computes them); close() writes the parquet files,
    stats.json and info.json and returns `path`.

    An episode is a dit4dit episode dict: action float32 (T, A), state (T+1 or T, P), instruction str,
    and its frames: "frames" uint8 (T+1 or T, H, W, 3) for a single camera named `cameras[0]`, or
    "cameras" {feature key: frames} holding every key of `cameras`. One row per action: frames[:T],
    state[:T], action (the frame after the last action has no action, so it is not stored). The
    instruction is the LeRobot task; "task" (the suite's task name), when present, is kept as the
    episode's `dit4dit/task`. names: the features' "names" entries ({"observation.state": ...,
    "action": ...}), None for none.

    Atomic: everything goes into a temporary folder beside `path`, renamed to `path` by close(). An
    existing `path` raises FileExistsError at once unless overwrite=True and it is a LeRobot dataset
    (then it is replaced whole, after the new dataset is complete). A bad episode raises ValueError
    naming it; abort() (or leaving a `with` block by an exception) removes the temporary folder and
    leaves `path` as it was."""

    def __init__(self, path, fps, cameras=("observation.images.image",), robot_type=None, names=None,
                 overwrite=False, codec="libsvtav1", crf=30, gop=2, preset=12):
        self._pa, self._pq, av = _require()
        path = os.path.abspath(os.fspath(path))
        if os.path.lexists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        if os.path.lexists(path) and not os.path.isfile(os.path.join(path, "meta", "info.json")):
            raise FileExistsError(f"{path} exists and is not a LeRobot dataset (no meta/info.json): not replacing it")
        cameras = (cameras,) if isinstance(cameras, str) else tuple(cameras)
        if not cameras or len(set(cameras)) != len(cameras):
            raise ValueError(f"LeRobotWriter: cameras must be distinct feature keys, got {cameras!r}")
        self.encoder, self.codec_name = _pick_encoder(av, codec)
        self.path, self.fps, self.cameras, self.robot_type = path, fps, cameras, robot_type
        self.names, self.video = dict(names or {}), (crf, gop, preset)
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        self.tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        os.makedirs(self.tmp)
        self.shapes, self.files, self.task_of = None, {}, {}
        self.states, self.actions, self.episodes = [], [], []   # per episode: state, action, episode row

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if kind is None:
            self.close()
        else:
            self.abort()

    def _check(self, ep):
        """(T, {camera: frames (T, H, W, 3)}, state (T, P), action (T, A)) of one episode, or ValueError."""
        name = f"episode {len(self.episodes)}" + (f" ({ep['path']})" if "path" in ep else "")
        need = ("state", "action", "instruction") + (("cameras",) if "cameras" in ep else ("frames",))
        missing = [k for k in need if k not in ep]
        if missing:
            raise ValueError(f"write_lerobot_v3: {name} lacks {missing}")
        views = dict(ep["cameras"]) if "cameras" in ep else {self.cameras[0]: ep["frames"]}
        if "frames" in need and len(self.cameras) > 1:
            raise ValueError(f"write_lerobot_v3: {name} has one camera (frames); the dataset has {list(self.cameras)}: "
                             f"give them as episode['cameras']")
        if sorted(views) != sorted(self.cameras):
            raise ValueError(f"write_lerobot_v3: {name} has cameras {sorted(views)}, the dataset {sorted(self.cameras)}")
        s, a = np.asarray(ep["state"]), np.asarray(ep["action"])
        if s.ndim != 2 or a.ndim != 2 or len(a) < 1:
            raise ValueError(f"write_lerobot_v3: {name}: state and action must be 2-D with at least one row, "
                             f"got {s.shape} and {a.shape}")
        T = len(a)
        for key, f in views.items():
            f = views[key] = np.asarray(f)
            if f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3:
                raise ValueError(f"write_lerobot_v3: {name}: frames must be uint8 (T, H, W, 3), got {f.dtype} "
                                 f"{f.shape} ({key})")
            if len(f) not in (T, T + 1) or len(s) not in (T, T + 1):
                raise ValueError(f"write_lerobot_v3: {name}: {len(f)} frames and {len(s)} states for {T} actions "
                                 f"(need T or T+1 of each)")
        here = {key: f.shape[1:3] for key, f in views.items()}, s.shape[1], a.shape[1]
        if self.shapes is None:
            odd = [key for key, (h, w) in here[0].items() if h % 2 or w % 2]
            if odd:
                raise ValueError(f"write_lerobot_v3: {name}: frames {here[0][odd[0]]} of {odd[0]} must have even "
                                 f"sides (yuv420p)")
            self.shapes = here
        elif here != self.shapes:
            raise ValueError(f"write_lerobot_v3: {name}: frames {here[0]}, state dim {here[1]}, action dim "
                             f"{here[2]}, but episode 0 has {self.shapes[0]}, {self.shapes[1]}, {self.shapes[2]}")
        return T, {key: f[:T] for key, f in views.items()}, s[:T].astype(np.float32), a.astype(np.float32)

    def add(self, ep):
        """Appends one episode (see the class docstring)."""
        T, views, state, action = self._check(ep)
        e, start = len(self.episodes), sum(len(a) for a in self.actions)
        task = str(ep["instruction"])
        self.task_of.setdefault(task, len(self.task_of))
        frame_index = np.arange(T)
        cols = {"timestamp": (frame_index / self.fps).astype(np.float32), "frame_index": frame_index, "episode_index": np.full(T, e),
                "index": start + frame_index, "task_index": np.full(T, self.task_of[task])}
        stats = {STATE_KEY: _stats_of(state.astype(np.float64)), ACTION_KEY: _stats_of(action.astype(np.float64))}
        row = {"episode_index": e, "tasks": [task], "length": T, "data/chunk_index": 0, "data/file_index": 0,
               "dataset_from_index": start, "dataset_to_index": start + T}
        for key in self.cameras:
            if key not in self.files:
                self.files[key] = _VideoFile(os.path.join(self.tmp, VIDEO_PATH_V3.format(
                    video_key=key, chunk_index=0, file_index=0)), self.fps, self.encoder, *self.video)
            row.update({f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": 0,
                        f"videos/{key}/from_timestamp": start / self.fps,
                        f"videos/{key}/to_timestamp": (start + T) / self.fps})
            self.files[key].write(views[key])
            stats[key] = _image_stats(views[key])
        stats.update({k: _stats_of(np.asarray(cols[k], np.float64)[:, None]) for k in INDEX_FEATURES})
        for key, values in stats.items():
            row.update({f"stats/{key}/{name}": np.asarray(v).tolist() for name, v in values.items()})
        row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        if "task" in ep:  # the suite's task name ("push"), which training balances over
            row["dit4dit/task"] = str(ep["task"])
        self.states.append(state)
        self.actions.append(action)
        self.episodes.append((row, stats))

    def abort(self):
        """Removes the temporary folder; `path` stays as it was."""
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def close(self):
        """Writes the data and meta files and moves the dataset to `path` (replacing an old one whole)."""
        try:
            if not self.episodes:
                raise ValueError("write_lerobot_v3: no episodes")
            for f in self.files.values():
                f.close()
            self._write_meta()
            if os.path.lexists(self.path):
                parent = os.path.dirname(self.path)
                old = os.path.join(parent, f".{os.path.basename(self.path)}.old-{uuid.uuid4().hex[:8]}")
                os.rename(self.path, old)
                os.rename(self.tmp, self.path)
                shutil.rmtree(old)
            else:
                os.rename(self.tmp, self.path)
        finally:
            if os.path.isdir(self.tmp):
                shutil.rmtree(self.tmp)
        return self.path

    def _write_meta(self):
        pa, pq, root = self._pa, self._pq, self.tmp
        lengths = [len(a) for a in self.actions]
        N, P, A = sum(lengths), self.shapes[1], self.shapes[2]
        state, action = np.concatenate(self.states), np.concatenate(self.actions)

        # --- data/chunk-000/file-000.parquet: one row per action
        frame_index = np.concatenate([np.arange(T) for T in lengths])
        cols = {"timestamp": (frame_index / self.fps).astype(np.float32), "frame_index": frame_index,
                "episode_index": np.repeat(np.arange(len(lengths)), lengths), "index": np.arange(N),
                "task_index": np.repeat([self.task_of[row["tasks"][0]] for row, _ in self.episodes], lengths)}
        table = pa.table({STATE_KEY: pa.FixedSizeListArray.from_arrays(pa.array(state.ravel()), P),
                          ACTION_KEY: pa.FixedSizeListArray.from_arrays(pa.array(action.ravel()), A),
                          **{k: pa.array(cols[k]) for k in INDEX_FEATURES}})
        table = table.replace_schema_metadata({"huggingface": _hf_features(P, A)})
        data_file = os.path.join(root, DATA_PATH_V3.format(chunk_index=0, file_index=0))
        os.makedirs(os.path.dirname(data_file))
        pq.write_table(table, data_file)

        # --- stats: aggregated (meta/stats.json); per episode in meta/episodes
        os.makedirs(os.path.join(root, "meta", "episodes", "chunk-000"))
        with open(os.path.join(root, "meta", "stats.json"), "w") as f:
            json.dump(_as_lists(aggregate_stats([stats for _, stats in self.episodes])), f, indent=4)
        pq.write_table(pa.Table.from_pylist([row for row, _ in self.episodes]),
                       os.path.join(root, "meta", "episodes", "chunk-000", "file-000.parquet"))

        # --- meta/tasks.parquet
        tasks = pa.table({"task_index": pa.array(list(self.task_of.values()), pa.int64()),
                          "task": pa.array(list(self.task_of))})
        pq.write_table(tasks.replace_schema_metadata({"pandas": _pandas_task_index()}),
                       os.path.join(root, "meta", "tasks.parquet"))

        # --- meta/info.json
        def scalar(dtype):
            return {"dtype": dtype, "shape": [1], "names": None}
        crf, gop, preset = self.video
        features = {}
        for key in self.cameras:
            H, W = self.shapes[0][key]
            features[key] = {
                "dtype": "video", "shape": [H, W, 3], "names": ["height", "width", "channels"],
                "info": {"video.height": H, "video.width": W, "video.codec": self.codec_name,
                         "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": self.fps,
                         "video.channels": 3, "video.g": gop, "video.crf": crf, "has_audio": False,
                         **({"video.preset": preset} if self.encoder == "libsvtav1" else {})}}
        features[STATE_KEY] = {"dtype": "float32", "shape": [P], "names": self.names.get(STATE_KEY)}
        features[ACTION_KEY] = {"dtype": "float32", "shape": [A], "names": self.names.get(ACTION_KEY)}
        features.update({"timestamp": scalar("float32"), **{k: scalar("int64") for k in INDEX_FEATURES[1:]}})
        info = {"codebase_version": "v3.0", "robot_type": self.robot_type, "total_episodes": len(lengths),
                "total_frames": N, "total_tasks": len(self.task_of), "chunks_size": CHUNKS_SIZE,
                "data_files_size_in_mb": 100, "video_files_size_in_mb": 200, "fps": self.fps,
                "splits": {"train": f"0:{len(lengths)}"}, "data_path": DATA_PATH_V3, "video_path": VIDEO_PATH_V3,
                "features": features}
        with open(os.path.join(root, "meta", "info.json"), "w") as f:
            json.dump(info, f, indent=4)


class _VideoFile:
    """One camera's mp4 of a dataset, written episode after episode: frame n at n / fps s."""

    def __init__(self, path, fps, encoder, crf, gop, preset):
        _, _, av = _require()
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its configuration on stderr otherwise
        self.options = {"g": str(gop), "crf": str(crf), **({"preset": str(preset)} if encoder == "libsvtav1" else {})}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.container = av.open(path, "w")
        self.fps, self.encoder, self.stream, self.n, self.av = Fraction(fps), encoder, None, 0, av

    def write(self, frames):
        if self.stream is None:  # the size is known at the first frames
            self.stream = self.container.add_stream(self.encoder, rate=self.fps, options=self.options)
            self.stream.height, self.stream.width = frames.shape[1:3]
            self.stream.pix_fmt = "yuv420p"
            self.stream.codec_context.time_base = Fraction(1) / self.fps
        for img in frames:
            frame = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = self.n
            self.n += 1
            self.container.mux(self.stream.encode(frame))

    def close(self):
        if self.container is None:
            return
        try:
            if self.stream is not None:
                self.container.mux(self.stream.encode(None))
        finally:
            self.container.close()
            self.container = None


def write_lerobot_v3(path, episodes, fps, camera_key="observation.images.image", robot_type=None,
                     overwrite=False, codec="libsvtav1", crf=30, gop=2, preset=12, names=None):
    """Write dit4dit episode dicts as a LeRobot v3.0 dataset at `path` (LeRobotWriter: one data file, one
    AV1 mp4 per camera, stats as lerobot computes them; atomic). camera_key: the feature key of the
    episodes' "frames", or a tuple of keys for episodes that carry "cameras". Returns `path`."""
    if len(episodes) == 0:
        raise ValueError("write_lerobot_v3: no episodes")
    with LeRobotWriter(path, fps, camera_key, robot_type=robot_type, names=names, overwrite=overwrite,
                       codec=codec, crf=crf, gop=gop, preset=preset) as writer:
        for ep in episodes:
            writer.add(ep)
    return writer.path
