"""Samples per second of the LeRobot reader (bridges/lerobot.py) through a torch DataLoader with 1 and
2 workers, on the libero_like fixture (64x64 AV1) and on a 256x256 dataset written to a temporary
folder with write_lerobot_v3. Each worker decodes the episodes it meets once and keeps them in
memory, so the first epoch ("cold") includes decoding and the second ("warm", persistent workers)
is indexing and collation only.

    python -m bench.lerobot [--episodes 20] [--length 100] [--batch-size 32]
"""
import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bridges.lerobot import LeRobotEpisodes, LeRobotSamples, write_lerobot_v3
from bench import cpu_name, load_average

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "lerobot" / "libero_like"


def machine():
    cpu, load = cpu_name(), load_average()
    return (f"{cpu}; {os.cpu_count()} CPUs; load average {load}; torch {torch.__version__} "
            f"({torch.get_num_threads()} thread(s) in the main process); python {platform.python_version()}")


def synthetic_dataset(path, episodes, length, size, seed=0):
    """A moving square on a ramping background, like the fixtures, at size x size."""
    rng = np.random.default_rng(seed)
    eps = []
    for e in range(episodes):
        frames = np.empty((length + 1, size, size, 3), np.uint8)
        for t in range(length + 1):
            frames[t] = (20 + t) % 256
            x = (3 * t) % (size - size // 4)
            frames[t, size // 8:size // 8 + size // 4, x:x + size // 4] = (200, (40 * e) % 256, 60)
        eps.append({"frames": frames, "state": rng.standard_normal((length + 1, 8)).astype(np.float32),
                    "action": rng.uniform(-1, 1, (length, 7)).astype(np.float32),
                    "instruction": f"task {e % 4}"})
    t0 = time.perf_counter()
    write_lerobot_v3(path, eps, fps=10)
    return time.perf_counter() - t0


def samples_per_second(root, workers, batch_size, image_size=None):
    """(cold, warm) samples/s over two shuffled epochs with persistent workers."""
    samples = LeRobotSamples(LeRobotEpisodes(root, image_size=image_size), num_future_frames=4, action_horizon=8)
    loader = torch.utils.data.DataLoader(samples, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(0))
    rates = []
    for _ in range(2):
        t0, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch["frames"])
        rates.append(n / (time.perf_counter() - t0))
    return rates, len(samples)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=20, help="episodes of the 256x256 dataset")
    parser.add_argument("--length", type=int, default=100, help="actions per episode of the 256x256 dataset")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "synthetic256"
        seconds = synthetic_dataset(big, args.episodes, args.length, 256)
        print(f"wrote {args.episodes} x {args.length} frames of 256x256 AV1 in {seconds:.1f} s "
              f"({args.episodes * args.length / seconds:.0f} frames/s)")
        t0 = time.perf_counter()
        reader = LeRobotEpisodes(big)
        for i in range(len(reader)):
            reader.frames(i)
        decode = time.perf_counter() - t0
        print(f"decoded it sequentially in {decode:.2f} s ({args.episodes * args.length / decode:.0f} frames/s, "
              f"1 decoder thread)")
        print(f"\n{'dataset':<34} {'samples':>7} {'workers':>7} {'cold samples/s':>15} {'warm samples/s':>15}")
        for name, root in (("libero_like fixture (64x64)", FIXTURE), ("synthetic 256x256", big)):
            for workers in (1, 2):
                (cold, warm), n = samples_per_second(root, workers, args.batch_size)
                print(f"{name:<34} {n:>7} {workers:>7} {cold:>15.0f} {warm:>15.0f}")
    print(f"\nsample: 5 frames (offsets 0, 2, 4, 6, 8), 8 actions, state; batch size {args.batch_size}; "
          f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
