"""Train DiT4DiT on the MuJoCo toy suite, then evaluate it in closed loop.

    python train_toy.py                         # demos -> train `toy` on CPU -> evaluate, all defaults
    python train_toy.py --steps 200 --out runs/quick
    python train_toy.py --action-only           # the ablation: same model, no video loss
    python train_toy.py --resume runs/x/checkpoint.pt
    python train_toy.py --suite metaworld --tasks drawer-open-v3 button-press-topdown-v3 --demos-per-task 10
    python train_toy.py --suite libero --libero-suite libero_object --demos-per-task 20   # scripted LIBERO demos
    python train_toy.py --dataset PATH          # any LeRobot v2.x/v3.0 dataset (bridges/lerobot.py)
    python train_toy.py --dataset PATH --inspect            # what the dataset holds, then stop
    python train_toy.py --export-dataset PATH   # the suite's demos as a LeRobot v3.0 dataset, then stop
    torchrun --nproc_per_node=2 train_toy.py --steps 1000   # DistributedDataParallel

Data (docs/design.md §3.1, §6). The suites' scripted experts collect demos (eval_sim.py), cached
as one compressed .npz per episode (bridges/episodes.py) under `<run parent>/demos/<task>_<size>px/` and reused on the next
run; `--data DIR` trains on episodes saved in the same format instead. One training sample is
    o_t, o_{t+s}, ..., o_{t+F·s}    current frame + F future frames, s = K / F (the chunk's span)
    s_t                             proprioceptive state, min-max normalized to [-1, 1]
    a_t, ..., a_{t+K-1}             the action chunk, min-max normalized to [-1, 1]
    the instruction string.
Past the episode end, frames repeat the last frame, and the chunk's steps there are padding: they
hold the "hold" action (zero motion) but the action mask is 0 on them, so the loss never trains
toward them. (Scoring them taught the robot to slow down: in short `reach` demos most chunk
entries were padded holds.)

Exact resume. Everything random in a training step (which samples, the model's noise draws,
dropout) is a function of (seed, step, which slice of the global batch) only, never of the RNG
state left by earlier steps, so a run resumed from its checkpoint at step N continues exactly as
the uninterrupted run would have (so the checkpoint holds no RNG state); and N processes x 1
micro-step train on the same samples with the same noise as 1 process x N micro-steps of
gradient accumulation.
"""
import argparse
import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import random
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import dit4dit
import eval_sim
import suites
from bridges.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from bridges.episodes import load_episode, save_episode
from bridges.files import atomic_write, remove_stale_temp_files
from bridges.frames import frames_to_video
from bridges.normalizer import Normalizer

# ----------------------------------------------------------------------------------------------
# Defaults: the budget of `python train_toy.py` on a 2-core laptop CPU. `push` needs about 6000
# steps (3900 gave 63 % on 150 seeds, docs/results.md), so the default takes 21-27 minutes; fewer
# steps at larger learning rates did not hold `push` (docs/results.md, 2026-12-08). Tune here.
PRESET = "toy"
STEPS = 6000               # optimizer steps
BATCH_SIZE = 32            # samples per step per process (before gradient accumulation)
LR_VIDEO = 3e-4            # peak learning rate of the video DiT (and the text encoder)
LR_ACTION = 1e-3           # peak learning rate of the action DiT
WARMUP = 100               # linear warm-up steps, then cosine down to MIN_LR_FRACTION of peak
MIN_LR_FRACTION = 0.05
WEIGHT_DECAY = 0.01        # AdamW, on matrices only (not on norms, biases, embeddings' 1-D params)
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
EMA_DECAY = 0.999          # exponential moving average of the weights: what is saved as "model" and evaluated (0: off)
DEMOS_PER_TASK = 500       # demo layouts per task
EARLY_WEIGHT = 4           # the samples of each demo's first K/2 steps are drawn this many times as often
DEMO_WORKERS = min(4, os.cpu_count() or 1)  # processes rendering demos (one per core, at most 4)
EVERY_PAD = True           # each layout demonstrated toward every pad (see collect_demos)
DEMO_NOISE = 0.3           # toy suite: std of the noise added to the expert's executed commands (DART; see
                           # eval_sim.collect_episode); the demos record the expert's clean commands
EVAL_EPISODES = 25         # per task: 2 tasks x 25 = the 50 evaluation episodes
LIBERO_EVAL_EPISODES = 10  # per task on LIBERO: init states 0..9 of its 50 (an episode is ~1 min on 2 cores)
LIBERO_EVAL_BATCH = 5      # LIBERO episodes in lockstep per evaluation process: an env holds ~0.8 GB
DATASET_SUITES = ("libero",)  # suites whose demos are kept as a LeRobot dataset (collect_dataset), not .npz
GIF_EPISODES = 2           # rollout GIFs written per task
CKPT_EVERY = 500
LOG_EVERY = 10             # steps between train_log.jsonl rows


# ----------------------------------------------------------------------------------------------
# Device, processes, seeds

def pick_device():
    """The one place that chooses device and precision: CUDA with bf16 autocast, else CPU fp32."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank), torch.bfloat16
    return torch.device("cpu"), None


def autocast(device, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def setup_distributed(device):
    """Join the torchrun process group when launched by torchrun. Returns (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def mix_seed(*numbers):
    """A well-mixed 63-bit seed from a tuple of non-negative ints (seed, step, micro, rank, ...)."""
    state = np.random.SeedSequence([int(n) for n in numbers]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & ((1 << 63) - 1)


def seed_everything(seed):
    """Seed torch (CPU and CUDA), numpy's and Python's global generators from one int."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ----------------------------------------------------------------------------------------------
# Demonstrations on disk

DEMO_FORMAT = 4  # in the cache folder's name: bumped whenever a suite's episodes change


def demo_cache_dir(cache_root, task, image_size, noise=0.0):
    return os.path.join(cache_root, f"{task}_{image_size}px_v{DEMO_FORMAT}" + (f"_noise{noise:g}" if noise else ""))


def collect_demos(tasks, demos_per_task, image_size, cache_root, progress=True, every_pad=EVERY_PAD, suite="toy",
                  noise=0.0):
    """Scripted-expert demos for each task, one .npz per episode; files already present are reused.

    demos_per_task layouts (demo seeds) per task. every_pad: each layout is demonstrated toward
    every pad, one episode per pad ("move to the red pad", "... the blue pad", ...), so the same
    first frame comes with as many different action chunks as there are pads and only the
    instruction tells them apart; otherwise one episode per layout, toward the pad its seed names.
    suite: the suite the tasks belong to; Meta-World has no pads (one episode per seed).
    noise: std of the noise on the executed commands (eval_sim.collect_episode; 0: none).
    Demos the expert failed are kept on disk (so the cache is complete) but not returned.
    Returns the list of successful episodes (dicts in bridges/episodes.py's format).
    """
    S = suites.get_suite(suite)
    jobs = [(task, seed, target) for task in tasks for seed in S.demo_seeds(task, demos_per_task)
            for target in (range(S.TASKS[task].num_pads) if every_pad and suite == "toy" else [None])]
    paths = [os.path.join(demo_cache_dir(cache_root, task, image_size, noise),
                          f"seed_{seed:06d}" + ("" if target is None else f"_pad{target}") + ".npz")
             for task, seed, target in jobs]
    missing = [(job, path) for job, path in zip(jobs, paths) if not os.path.exists(path)]
    for folder in sorted({os.path.dirname(path) for _, path in missing}):
        os.makedirs(folder, exist_ok=True)
        remove_stale_temp_files(folder)
    workers = max(1, min(DEMO_WORKERS, len(missing)))
    bar = tqdm(total=len(missing), desc="demos", unit="ep", disable=not progress or not missing)
    if workers == 1:
        for job, path in missing:
            _collect_demo(*job, image_size, suite, noise, path)
            bar.update()
    else:  # one rendering process per core; "spawn": no GL context or torch thread pool is inherited
        import concurrent.futures
        import multiprocessing
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for done in concurrent.futures.as_completed(
                    [pool.submit(_collect_demo, *job, image_size, suite, noise, path) for job, path in missing]):
                done.result()  # an expert or renderer error surfaces here
                bar.update()
    bar.close()
    episodes, failed = [], 0
    for path in paths:
        episode = load_episode(path)
        if episode["success"]:
            episodes.append({**episode, "path": path})
        else:
            failed += 1
    if failed and progress:
        print(f"skipped {failed} demo(s) the scripted expert failed")
    if not episodes:
        raise RuntimeError(f"no successful demos for tasks {tasks} in {cache_root}")
    return episodes


def _collect_demo(task, seed, target, image_size, suite, noise, path):
    """One scripted-expert episode written to `path` (atomically): collect_demos' unit of work."""
    torch.set_num_threads(1)
    save_episode(path, eval_sim.collect_episode(task, seed, image_size, target=target, suite=suite,
                                                noise=noise))


def demo_dataset_dir(cache_root, suite, tasks, demos_per_task, libero_suite=None):
    """Where collect_dataset keeps the demos of `tasks` as a LeRobot dataset: named by the LIBERO suite
    when the tasks are all of it, else by a hash of the task names."""
    name = libero_suite or "tasks-" + hashlib.sha256(" ".join(tasks).encode()).hexdigest()[:10]
    return os.path.join(cache_root, f"{suite}_{name}_{demos_per_task}demos_v{DEMO_FORMAT}_lerobot")


def collect_dataset(tasks, demos_per_task, path, suite="libero", progress=True):
    """Scripted-expert demos of each task (the suite's demo seeds: new layouts, never an evaluation
    init state), written as one LeRobot v3.0 dataset at `path` in the suite's dataset conventions
    (its cameras at their own resolution, its state and action names, fps = the control rate): what
    the real datasets of that benchmark hold, so the same reader trains on either. Collected in
    DEMO_WORKERS processes, written in job order as they finish (memory: a few episodes); episodes
    the expert failed are left out and counted. An existing dataset at `path` is reused: the writer
    renames it into place only once it is complete. Returns path."""
    from bridges.lerobot import LeRobotWriter  # needs pyarrow and av: pip install -e .[data]

    if os.path.isfile(os.path.join(path, "meta", "info.json")):
        if progress:
            print(f"demos: reusing the dataset {path}")
        return path
    S = suites.get_suite(suite)
    jobs = [(task, seed) for task in tasks for seed in S.demo_seeds(task, demos_per_task)]
    failed = {}
    bar = tqdm(total=len(jobs), desc="demos", unit="ep", disable=not progress)
    with LeRobotWriter(path, fps=round(1 / S.CONTROL_DT), cameras=tuple(S.CAMERA_FEATURES.values()),
                       robot_type=S.ROBOT_TYPE, names=S.DATASET_NAMES) as writer:
        def keep(episode):
            if episode["success"]:
                writer.add(episode)
            else:
                failed[episode["task"]] = failed.get(episode["task"], 0) + 1
            bar.update()
        workers = max(1, min(DEMO_WORKERS, len(jobs)))
        if workers == 1:
            for job in jobs:
                keep(_expert_episode(*job, suite))
        else:  # "spawn": no GL context or torch thread pool is inherited
            import concurrent.futures
            import multiprocessing
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for future in [pool.submit(_expert_episode, *job, suite) for job in jobs]:
                    keep(future.result())  # in job order: the dataset does not depend on timing
        if len(writer.episodes) == 0:
            raise RuntimeError(f"the scripted expert failed every demo of {tasks}: no dataset written")
    bar.close()
    if progress:
        print(f"demos: wrote {len(writer.episodes)} episodes to {path}"
              + (f"; the expert failed {sum(failed.values())} (left out): {failed}" if failed else ""))
    return path


def _expert_episode(task, seed, suite):
    """One scripted-expert episode with its cameras' frames (collect_dataset's unit of work)."""
    torch.set_num_threads(1)
    return eval_sim.collect_episode(task, seed, suite=suite)


def load_episodes(data_dir, progress=True):
    """The successful episodes among `DIR/**/*.npz` (bridges/episodes.py's format), in sorted
    path order. A corrupt file raises a ValueError naming it."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data: {data_dir!r} is not a directory")
    paths = sorted(glob.glob(os.path.join(data_dir, "**", "*.npz"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"--data: no episode files (*.npz) under {data_dir!r}")
    episodes = [{**load_episode(p), "path": p}
                for p in tqdm(paths, desc="episodes", unit="ep", disable=not progress)]
    successful = [ep for ep in episodes if ep["success"]]
    if not successful:
        raise ValueError(f"--data: none of the {len(paths)} episodes under {data_dir!r} is marked successful")
    if len(successful) < len(episodes) and progress:
        print(f"skipped {len(episodes) - len(successful)} episode(s) marked unsuccessful")
    return successful


def episode_name(episode, i):
    """How errors name an episode: its file (episodes loaded or collected here carry "path")."""
    return f"episode file {episode['path']}" if "path" in episode else f"episode {i}"


def check_episodes(episodes):
    """Every episode has the first one's frame size, state dim and action dim, and at least one
    frame and state per action; ValueError naming the file that differs."""
    if not episodes:
        raise ValueError("no episodes")
    first = episodes[0]
    for i, ep in enumerate(episodes):
        for what, shape in (("frames of shape", lambda e: e["frames"].shape[1:]),
                            ("state dim", lambda e: e["state"].shape[-1]), ("action dim", lambda e: e["action"].shape[-1])):
            if shape(ep) != shape(first):
                raise ValueError(f"{episode_name(ep, i)}: {what} {shape(ep)}, but {episode_name(first, 0)} has "
                                 f"{shape(first)} (all episodes must match)")
        if len(ep["action"]) < 1 or len(ep["frames"]) < len(ep["action"]) or len(ep["state"]) < len(ep["action"]):
            raise ValueError(f"{episode_name(ep, i)}: {len(ep['frames'])} frames, {len(ep['state'])} states and "
                             f"{len(ep['action'])} actions; need at least one frame and state per action")


# ----------------------------------------------------------------------------------------------
# Dataset: episodes -> training samples

class EpisodeDataset:
    """Every time step t of every episode is one sample (docs/design.md §3.1).

    All frames stay in memory as one uint8 tensor (N_total, H, W, 3); states and actions are
    normalized once at construction. `batch(indices)` gathers a whole batch with tensor indexing
    and converts frames to video with frames_to_video, so there is no per-sample Python
    work and no DataLoader workers.
    """

    def __init__(self, episodes, num_future_frames, action_horizon, state_normalizer, action_normalizer,
                 early_weight=1):
        F, K = num_future_frames, action_horizon
        if not isinstance(early_weight, int) or early_weight < 1:
            raise ValueError(f"early_weight must be an int >= 1, got {early_weight!r}")
        if F < 1 or K < 1 or K % F != 0:
            raise ValueError(f"action_horizon K={K} must be a positive multiple of num_future_frames F={F}")
        check_episodes(episodes)
        self.num_future_frames, self.action_horizon, self.stride = F, K, K // F
        self.state_normalizer, self.action_normalizer = state_normalizer, action_normalizer
        frames, states, actions, frame_starts, step_starts, n_frames, n_steps = [], [], [], [], [], [], []
        f0 = s0 = 0
        for ep in episodes:
            frames.append(torch.from_numpy(np.ascontiguousarray(ep["frames"], dtype=np.uint8)))
            states.append(torch.as_tensor(np.asarray(ep["state"][: len(ep["action"])], dtype=np.float32)))
            actions.append(torch.as_tensor(np.asarray(ep["action"], dtype=np.float32)))
            frame_starts.append(f0)
            step_starts.append(s0)
            n_frames.append(len(ep["frames"]))
            n_steps.append(len(ep["action"]))
            f0 += len(ep["frames"])
            s0 += len(ep["action"])
        self.frames = torch.cat(frames)                                        # (N_frames, H, W, 3) uint8
        self.states = state_normalizer.normalize(torch.cat(states)).float()    # (N_steps, P)
        self.actions = action_normalizer.normalize(torch.cat(actions)).float()  # (N_steps, A)
        # The hold action (zero motion), normalized like every other action.
        self.pad_action = action_normalizer.normalize(torch.zeros(1, self.actions.shape[1])).float()[0]
        self.frame_starts = torch.tensor(frame_starts)
        self.step_starts = torch.tensor(step_starts)
        self.n_frames = torch.tensor(n_frames)
        self.n_steps = torch.tensor(n_steps)
        self.instructions = [ep["instruction"] for ep in episodes]
        # The table training draws from. Within an episode, the samples of its first K/2 steps (the
        # first chunk a policy executes: where the instruction decides where to go, while later
        # the scene itself shows the way) appear early_weight times. Across tasks, each task's
        # entries are repeated (cyclically) up to the largest task's count, so every task gives
        # an equal share of every batch whatever its episode lengths.
        tasks = [str(ep.get("task", "")) for ep in episodes]
        first = 0
        per_task = {}
        for task, n in zip(tasks, n_steps):
            steps = torch.arange(first, first + n)
            per_task.setdefault(task, []).extend([steps] + [steps[: K // 2]] * (early_weight - 1))
            first += n
        per_task = [torch.cat(chunks) for chunks in per_task.values()]
        largest = max(len(idx) for idx in per_task)
        self.balanced = torch.cat([idx[torch.arange(largest) % len(idx)] for idx in per_task])
        # sample index -> (episode, t)
        self.sample_episode = torch.repeat_interleave(torch.arange(len(episodes)), self.n_steps)
        self.sample_t = torch.cat([torch.arange(n) for n in n_steps])

    def __len__(self):
        return len(self.sample_t)

    def gather(self, indices):
        """Raw sample fields for a 1-D index tensor: frames uint8 (B, 1+F, H, W, 3),
        state (B, P), actions (B, K, A), action_mask (B, K, A) (0 on steps past the episode's end),
        instructions list[str]."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.numel() and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)})")
        ep, t = self.sample_episode[indices], self.sample_t[indices]                # (B,), (B,)
        F, K, s = self.num_future_frames, self.action_horizon, self.stride
        frame_t = t[:, None] + s * torch.arange(F + 1)[None]                        # (B, 1+F): t, t+s, ..., t+F·s
        frame_t = torch.minimum(frame_t, self.n_frames[ep][:, None] - 1)            # past the end: last frame
        frames = self.frames[self.frame_starts[ep][:, None] + frame_t]              # (B, 1+F, H, W, 3)
        action_t = t[:, None] + torch.arange(K)[None]                               # (B, K): t .. t+K-1
        inside = action_t < self.n_steps[ep][:, None]                               # (B, K)
        action_t = torch.minimum(action_t, self.n_steps[ep][:, None] - 1)
        actions = self.actions[self.step_starts[ep][:, None] + action_t]            # (B, K, A)
        actions = torch.where(inside[..., None], actions, self.pad_action)          # past the end: hold
        mask = inside[..., None].expand_as(actions).float()                         # (B, K, A): 0 past the end
        state = self.states[self.step_starts[ep] + t]                               # (B, P)
        return {"frames": frames, "state": state, "actions": actions, "action_mask": mask,
                "instruction": [self.instructions[e] for e in ep.tolist()]}

    def __getitem__(self, i):
        sample = self.gather(torch.tensor([i]))
        return {k: v[0] for k, v in sample.items()}

    def batch(self, indices, device=None):
        """A model batch (the keys DiT4DiT.loss reads) for a 1-D index tensor."""
        sample = self.gather(indices)
        batch = {"video": frames_to_video(sample["frames"]),                # (B, 3, 1+F, H, W)
                 "state": sample["state"], "actions": sample["actions"],
                 "action_mask": sample["action_mask"], "instruction": sample["instruction"]}
        if device is not None:
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        return batch


def batch_indices(num_samples, seed, step, micro, rank, world, batch_size, grad_accum):
    """Sample indices of (step, micro-step, rank), like DistributedSampler over endless epochs.

    The sample stream is a concatenation of random permutations of the dataset, one per epoch,
    each seeded by (seed, epoch). Optimizer step `step` consumes the next
    batch_size·world·grad_accum entries; each micro-step and rank takes its own slice of them.
    The result depends only on the arguments, which is what makes resuming exact.
    """
    global_batch = batch_size * world * grad_accum
    first = step * global_batch + (micro * world + rank) * batch_size
    positions = torch.arange(first, first + batch_size)
    epochs = positions // num_samples
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        generator = torch.Generator().manual_seed(mix_seed(seed, epoch, 0xDA7A))
        perm = torch.randperm(num_samples, generator=generator)
        here = epochs == epoch
        out[here] = perm[positions[here] % num_samples]
    return out


# ----------------------------------------------------------------------------------------------
# Model, optimizer, schedule

class LossModule(nn.Module):
    """Routes forward() to DiT4DiT.loss so DistributedDataParallel sees the training forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, generator=None):
        return self.model.loss(batch, generator=generator)


ACTION_PREFIXES = ("action_dit.",)  # parameter-name prefixes trained at the action learning rate


def param_groups(model, lr_video, lr_action, weight_decay=WEIGHT_DECAY):
    """AdamW groups: the action DiT at lr_action, everything else (video DiT, text encoder) at
    lr_video (docs/design.md §3.9: 1e-5 video / 1e-4 action at paper scale); no decay on 1-D params."""
    groups = {(name, decay): [] for name in ("video", "action") for decay in (True, False)}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "action" if pname.startswith(ACTION_PREFIXES) else "video"
        groups[(part, p.ndim >= 2)].append(p)
    lrs = {"video": lr_video, "action": lr_action}
    return [{"params": ps, "lr": lrs[part], "weight_decay": weight_decay if decay else 0.0, "name": part}
            for (part, decay), ps in groups.items() if ps]


def lr_factor(step, warmup, total, min_fraction=MIN_LR_FRACTION):
    """Linear warm-up to the peak, then cosine down to min_fraction of the peak at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, args):
    optimizer = torch.optim.AdamW(param_groups(model, args.lr_video, args.lr_action), betas=BETAS)
    warmup = min(args.warmup, max(1, args.steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, args.steps))
    return optimizer, scheduler


def build_config(args, **data_shapes):
    """The preset with the data's shapes (image_size, state_dim, action_dim) and the flags that
    override config fields; a flag left unset keeps the preset's value. The config owns the rules
    between fields: a contradiction (--action-only with --detach-features) raises its ValueError."""
    flags = {"video_loss_weight": args.video_loss_weight, "repeat": args.repeat,
             "extract_layer": args.extract_layer, "detach_features": args.detach_features,
             "action_only": args.action_only}
    return dit4dit.make_config(args.preset, **data_shapes, **{k: v for k, v in flags.items() if v is not None})


# ----------------------------------------------------------------------------------------------
# Loss curve (pillow)

def draw_loss_curve(rows, path, size=(900, 520)):
    """loss, video_loss and action_loss against the step, log-scaled y axis, written as a PNG."""
    series = [("loss", (20, 20, 20)), ("video_loss", (40, 90, 220)), ("action_loss", (220, 60, 40))]
    series = [(k, c) for k, c in series if any((r.get(k) or 0) > 0 for r in rows)]  # action-only: no video_loss
    width, height = size
    left, right, top, bottom = 80, 20, 40, 60
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((left, 12), "DiT4DiT training loss (log scale)", fill="black", font=font)
    values = [r[k] for r in rows for k, _ in series if r.get(k) is not None and r[k] > 0]
    steps = [r["step"] for r in rows]
    if not values:
        draw.text((left, height // 2), "no loss values logged", fill="black", font=font)
        image.save(path)
        return
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = math.floor(math.log10(min(values)) * 4) / 4, math.ceil(math.log10(max(values)) * 4) / 4
    y1 = max(y1, y0 + 0.25)

    def to_px(step, value):
        x = left + (step - x0) / (x1 - x0) * (width - left - right)
        y = top + (y1 - math.log10(value)) / (y1 - y0) * (height - top - bottom)
        return x, y

    # axes, ticks and grid
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(6):
        step = x0 + (x1 - x0) * i / 5
        x, _ = to_px(step, 10 ** y0)
        draw.line([x, height - bottom, x, height - bottom + 5], fill="black")
        draw.text((x - 12, height - bottom + 8), f"{step:.0f}", fill="black", font=font)
    mantissas = (1, 2, 5) if y1 - y0 > 1 else (1, 1.5, 2, 3, 4, 5, 6, 8)
    exponent = math.floor(y0)
    while exponent <= y1:
        for mantissa in mantissas:
            value = mantissa * 10 ** exponent
            if y0 <= math.log10(value) <= y1:
                _, y = to_px(x0, value)
                draw.line([left, y, width - right, y], fill=(225, 225, 225))
                draw.line([left - 5, y, left, y], fill="black")
                draw.text((8, y - 6), f"{value:.3g}", fill="black", font=font)
        exponent += 1
    draw.text(((left + width - right) // 2 - 15, height - 22), "step", fill="black", font=font)
    draw.text((8, top - 20), "loss", fill="black", font=font)
    # curves and legend
    for i, (key, colour) in enumerate(series):
        points = [to_px(r["step"], r[key]) for r in rows if r.get(key) is not None and r[key] > 0]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        elif points:
            x, y = points[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        lx, ly = width - right - 150, top + 10 + 16 * i
        draw.line([lx, ly + 6, lx + 24, ly + 6], fill=colour, width=2)
        draw.text((lx + 30, ly), key, fill="black", font=font)
    image.save(path)


def read_log(path, upto_step=None):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if upto_step is None or r["step"] <= upto_step]


def write_log(path, rows):
    atomic_write(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in rows), mode="w")


# ----------------------------------------------------------------------------------------------
# Checkpoints (layout: bridges/checkpoint.py; this script adds the training state)

def save_training_checkpoint(path, model, optimizer, scheduler, step, state_normalizer, action_normalizer, args,
                             average=None, experiment=None, changes=()):
    """With a weight average: "model" holds the averaged weights (what eval_sim.py and
    model_from_checkpoint load) and "training_weights" the optimizer's (what --resume
    continues from)."""
    extra = dict(step=step, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                 args={k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()},
                 experiment=experiment, changes=list(changes))
    if average is None:
        save_checkpoint(path, model, state_normalizer, action_normalizer, **extra)
        return
    training_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with average.applied(model):
        save_checkpoint(path, model, state_normalizer, action_normalizer,
                                training_weights=training_weights, **extra)


class WeightAverage:
    """Exponential moving average of a model's parameters, the weights a diffusion policy is usually
    evaluated with. After optimizer step n (0-based) it moves toward the parameters by
    1 - min(decay, (1 + n) / (10 + n)): the warm-up keeps it from remembering the random init.
    Buffers are not averaged (the model's own are used)."""

    def __init__(self, model, decay, start=None):
        """start: a state dict to begin from (a resumed checkpoint's "model"); default the model's."""
        self.decay = decay
        named = dict(model.named_parameters())
        source = named if start is None else start
        self.names = list(named)
        self.params = [source[n].detach().to(named[n].device, named[n].dtype).clone() for n in self.names]

    @torch.no_grad()
    def update(self, model, step):
        rate = 1.0 - min(self.decay, (1.0 + step) / (10.0 + step))
        torch._foreach_lerp_(self.params, [p.detach() for p in model.parameters()], rate)

    @contextlib.contextmanager
    def applied(self, model):
        """The model holds the averaged weights inside the block, its own again after it."""
        params = list(model.parameters())
        kept = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch._foreach_copy_(params, self.params)
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, kept)


TRAINING_KEYS = ("step", "optimizer", "scheduler", "args")  # what this script adds to dit4dit's layout


# ----------------------------------------------------------------------------------------------
# What defines an experiment. A checkpoint records it; resuming with any of it changed is refused
# (--allow-changes continues with the new values and writes them into train_log.jsonl).

EXPERIMENT_FLAGS = ("preset", "steps", "batch_size", "grad_accum", "lr_video", "lr_action", "warmup", "seed",
                    "demos_per_task", "every_pad", "early_weight", "ema_decay", "demo_noise", "cameras")


def experiment_record(args, config, world=None, data=None, known=None):
    """name -> value of everything that defines the run: the flags above ("--steps"), the tasks,
    the number of processes, every config field ("config.image_size") and a fingerprint of the
    training data. args: a Namespace or a checkpoint's args dict; config: a DiT4DiTConfig or its
    dict; world and data None when unknown; known: the config fields to include (default all)."""
    a = args if isinstance(args, dict) else vars(args)
    record = {f"--{name.replace('_', '-')}": a.get(name) for name in EXPERIMENT_FLAGS}
    if a.get("data") or a.get("dataset"):
        record["--demos-per-task"] = record["--every-pad"] = None  # unused with episodes from disk
    record["--tasks"] = sorted(a.get("tasks") or (suites.get_suite(a["suite"]).TASKS if a.get("suite") else []))
    config = config if isinstance(config, dict) else dataclasses.asdict(config)
    record.update({f"config.{k}": v for k, v in config.items() if known is None or k in known})
    if world is not None:
        record["processes"] = world
    if data is not None:
        record["data"] = data
    return record


def data_fingerprint(episodes):
    """'N episodes, sha256 XXXX': their count and a hash of their instructions, states, actions and
    frame shapes in order (cheap: no pixels), so training on other data shows as a change."""
    digest = hashlib.sha256()
    for ep in episodes:
        digest.update(f"{ep['instruction']}|{ep['frames'].shape}".encode())
        digest.update(np.ascontiguousarray(ep["state"], dtype=np.float32))
        digest.update(np.ascontiguousarray(ep["action"], dtype=np.float32))
    return f"{len(episodes)} episodes, sha256 {digest.hexdigest()[:16]}"


def checkpoint_experiment(ckpt):
    """The record a checkpoint was trained with (rebuilt from its args and config when it was
    written before checkpoints stored one: without processes and data)."""
    return ckpt.get("experiment") or experiment_record(ckpt["args"], ckpt["config"])


def experiment_changes(old, new):
    """'NAME OLD -> NEW' for every entry both records hold and that differs, in new's order."""
    return [f"{k} {old[k]!r} -> {new[k]!r}" for k in new if k in old and old[k] != new[k]]


def refuse_or_allow(args, changes):
    if changes and not args.allow_changes:
        raise ValueError(f"--resume {args.resume}: this run would change the experiment the checkpoint was trained "
                         f"with: {', '.join(changes)}. Give the checkpoint's values, or pass --allow-changes to "
                         f"continue with the new ones (recorded in train_log.jsonl)")
    return changes


def load_resume(args):
    """The verified checkpoint of --resume (dit4dit.load_checkpoint, plus this script's training
    state), checked against the flags before any data or folder is touched: a changed experiment
    (as far as the flags tell; the data follows in main) or a finished run is refused."""
    ckpt = load_checkpoint(args.resume)  # errors name the file
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"--resume: checkpoint {args.resume} holds no training state ({missing} missing): it "
                         f"was not written by train_toy.py; evaluate it with eval_sim.py --ckpt, or train anew")
    image_size = args.image_size or (None if args.data else dit4dit.make_config(args.preset).image_size)
    known = {f.name for f in dataclasses.fields(dit4dit.DiT4DiTConfig)} - {"state_dim", "action_dim"}
    if image_size is None:  # from the episodes on disk: compared once they are read
        known.discard("image_size")
    config = build_config(args, **({} if image_size is None else {"image_size": image_size}))
    refuse_or_allow(args, experiment_changes(checkpoint_experiment(ckpt), experiment_record(args, config, known=known)))
    if int(ckpt["step"]) >= args.steps:
        raise ValueError(f"--resume: checkpoint {args.resume} has already trained {int(ckpt['step'])} of --steps "
                         f"{args.steps}: nothing left to train. Evaluate it with `python eval_sim.py --ckpt "
                         f"{args.resume}`, or continue to more steps with --steps N --allow-changes")
    return ckpt


def apply_schedule(optimizer, scheduler, args):
    """After loading a checkpoint's optimizer and scheduler under --allow-changes: the peak learning
    rates of the flags, and this step's rate from the schedule of the flags (load_state_dict
    brought back the old ones)."""
    peak = {"video": args.lr_video, "action": args.lr_action}
    scheduler.base_lrs = [peak[group["name"]] for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)


# ----------------------------------------------------------------------------------------------
# The run folder: one run at a time (a lock file holding "pid host"), and a folder that holds a
# run is continued with --resume or replaced with --overwrite, never overwritten silently.

RUN_LOCK = ".train.lock"
RUN_FILES = ("checkpoint.pt", "train_log.jsonl", "report.json", "loss.png")  # what --overwrite deletes


def lock_holder(out):
    """'pid N on HOST' of a live run holding out's lock, or None (no lock, or its process is gone)."""
    try:
        with open(os.path.join(out, RUN_LOCK)) as f:
            pid, host = f.read().split()
        pid = int(pid)
    except (OSError, ValueError):
        return None  # no lock, or one cut short by a kill before it was written
    if host != socket.gethostname():
        return f"pid {pid} on {host}; if that run is gone, delete {os.path.join(out, RUN_LOCK)}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return f"pid {pid}"


def check_out_folder(args):
    """Refuse, before any work, a folder another live run is writing into, and a new run into a
    folder that holds a run (unless it is the checkpoint resumed, or --overwrite)."""
    holder = lock_holder(args.out)
    if holder:
        raise FileExistsError(f"--out {args.out}: another run ({holder}) is writing into it")
    ckpt = os.path.join(args.out, "checkpoint.pt")
    resuming_it = args.resume is not None and os.path.exists(ckpt) and os.path.samefile(ckpt, args.resume)
    if os.path.exists(ckpt) and not resuming_it and not args.overwrite:
        raise FileExistsError(f"--out {args.out} already holds a run ({ckpt}): continue it with --resume {ckpt}, "
                              f"or pass --overwrite to replace it")


def claim_out_folder(args):
    """Create --out and take its lock (a stale lock of a dead process is taken over); remove the
    temporary files a killed run left, and with --overwrite the previous run's files. Returns the
    lock's path."""
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, RUN_LOCK)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = lock_holder(args.out)
            if holder:
                raise FileExistsError(f"--out {args.out}: another run ({holder}) is writing into it") from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        break
    else:
        raise FileExistsError(f"--out {args.out}: another run took the lock {path} first")
    remove_stale_temp_files(args.out)
    if args.overwrite:
        for name in RUN_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(args.out, name))
    return path


def release_out_folder(lock_path):
    with contextlib.suppress(OSError, ValueError):
        with open(lock_path) as f:
            mine = int(f.read().split()[0]) == os.getpid()
        if mine:
            os.remove(lock_path)


def default_out_dir():
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


# ----------------------------------------------------------------------------------------------
# The run, in three parts: data, the training loop, the finish

@dataclasses.dataclass(frozen=True)
class Process:
    """Where this process trains: device and autocast dtype (pick_device), rank among world."""
    device: torch.device
    amp_dtype: torch.dtype | None
    rank: int
    world: int

    @property
    def is_main(self):
        return self.rank == 0


def load_data(args, tasks, proc):
    """The training episodes: from --data, from a LeRobot --dataset, or scripted demos collected
    once on rank 0 (cached on disk) and read by every rank. Returns (episodes, normalizers: the
    dataset's own statistics for --dataset, else None, seconds it took)."""
    t0 = time.time()
    normalizers = None
    dataset = args.dataset
    if dataset is None and not args.data and args.suite in DATASET_SUITES:  # demos written as a LeRobot dataset
        cache = args.demo_cache or os.path.join(os.path.dirname(os.path.abspath(args.out)), "demos")
        dataset = demo_dataset_dir(cache, args.suite, tasks, args.demos_per_task, args.libero_suite)
        if proc.is_main:
            collect_dataset(tasks, args.demos_per_task, dataset, suite=args.suite)
            print(f"demos ready in {time.time() - t0:.1f} s")
        barrier()
    if dataset:
        from bridges.lerobot import LeRobotEpisodes  # needs pyarrow and av: pip install -e .[data]

        reader = LeRobotEpisodes(dataset, cameras=args.cameras,
                                 image_size=args.image_size or dit4dit.make_config(args.preset).image_size)
        episodes, normalizers = reader.episodes(progress=proc.is_main), reader.normalizers()
    elif args.data:
        episodes = load_episodes(args.data, progress=proc.is_main)
    else:
        image_size = args.image_size or dit4dit.make_config(args.preset).image_size
        cache = args.demo_cache or os.path.join(os.path.dirname(os.path.abspath(args.out)), "demos")
        if proc.is_main:
            collect_demos(tasks, args.demos_per_task, image_size, cache, every_pad=args.every_pad, suite=args.suite,
                          noise=args.demo_noise)
            print(f"demos ready in {time.time() - t0:.1f} s ({cache})")
        barrier()
        episodes = collect_demos(tasks, args.demos_per_task, image_size, cache, progress=False,
                                 every_pad=args.every_pad, suite=args.suite, noise=args.demo_noise)
    check_episodes(episodes)
    image_size = episodes[0]["frames"].shape[1]
    if args.image_size is not None and args.image_size != image_size:
        raise ValueError(f"--image-size {args.image_size} does not match the episodes' {image_size}px frames")
    return episodes, normalizers, time.time() - t0


def data_config(args, episodes):
    """The config of this run: the preset, the flags and the episodes' shapes."""
    return build_config(args, image_size=episodes[0]["frames"].shape[1], state_dim=episodes[0]["state"].shape[-1],
                        action_dim=episodes[0]["action"].shape[-1])


def model_and_normalizers(config, args, episodes, resume, normalizers=None):
    """(model, state_normalizer, action_normalizer): when resuming, the checkpoint's weights and
    statistics (not a refit) in a model of `config` (the checkpoint's own unless --allow-changes
    changed it); else `normalizers` (a dataset's own statistics) or statistics fitted to the
    episodes, and a model initialized from --seed."""
    if resume is not None:
        model, state_normalizer, action_normalizer = model_from_checkpoint(resume)
        if "training_weights" in resume:  # "model" holds the weight average (see save_training_checkpoint)
            model.load_state_dict(resume["training_weights"])
        if model.config != config:  # only under --allow-changes (checked in main)
            weights, model = model.state_dict(), dit4dit.DiT4DiT(config)
            try:
                model.load_state_dict(weights)
            except RuntimeError as err:
                raise ValueError(f"--allow-changes: the weights of {args.resume} do not fit the changed config: "
                                 f"{str(err).splitlines()[-1].strip()}") from None
        return model, state_normalizer, action_normalizer
    if normalizers is not None:
        state_normalizer, action_normalizer = normalizers
    else:
        state_normalizer = Normalizer.fit(np.concatenate([e["state"] for e in episodes]))
        action_normalizer = Normalizer.fit(np.concatenate([e["action"] for e in episodes]))
    seed_everything(args.seed)
    return dit4dit.DiT4DiT(config), state_normalizer, action_normalizer


class PhaseTimer:
    """Wall seconds per phase of a run, for the breakdown printed at its end. On CUDA a phase ends
    with a synchronize, so the GPU's queued work is charged to the phase that queued it."""

    def __init__(self, device):
        self.device, self.seconds = device, {}

    @contextlib.contextmanager
    def __call__(self, name):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def report(self, total):
        """Lines 'phase  seconds  share of total', then what no phase covers."""
        lines = [f"  {name:<22} {sec:8.1f} s  {sec / total:6.1%}" for name, sec in self.seconds.items()]
        rest = total - sum(self.seconds.values())
        return "\n".join(lines + [f"  {'other':<22} {rest:8.1f} s  {rest / total:6.1%}"])


def train_step(proc, args, model, wrapped, optimizer, scheduler, dataset, step, average=None, timer=None):
    """One optimizer step of args.grad_accum micro-steps; DDP all-reduces the gradients on the last
    micro-step only (no_sync on the others). Returns (losses: [loss, video_loss, action_loss]
    averaged over micro-steps and processes, the clipped gradient norm, the learning rates used).
    timer (a PhaseTimer): charges data, forward, backward and optimizer time to their phases."""
    timer = timer or PhaseTimer(torch.device("cpu"))
    totals = torch.zeros(3, device=proc.device)  # loss, video_loss, action_loss summed over micro-steps
    for micro in range(args.grad_accum):
        with timer("train: data"):
            positions = batch_indices(len(dataset.balanced), args.seed, step, micro, proc.rank, proc.world,
                                      args.batch_size, args.grad_accum)
            indices = dataset.balanced[positions]  # task-balanced (see EpisodeDataset)
            batch = dataset.batch(indices, proc.device)
        # The model's noise draws (generator) and anything on the global RNGs (dropout), seeded
        # by this micro-batch's slice of the global batch: N processes x 1 micro-step draw
        # exactly what 1 process x N micro-steps draws, and a resumed run what the uninterrupted
        # one drew (so a checkpoint needs no RNG state).
        noise_seed = mix_seed(args.seed, step, micro * proc.world + proc.rank)
        seed_everything(noise_seed)
        generator = torch.Generator(device=proc.device).manual_seed(noise_seed)
        final = micro == args.grad_accum - 1
        with contextlib.nullcontext() if (final or proc.world == 1) else wrapped.no_sync():
            with timer("train: forward"), autocast(proc.device, proc.amp_dtype):
                losses = wrapped(batch, generator)
            with timer("train: backward"):
                (losses["loss"] / args.grad_accum).backward()
        totals += torch.stack([losses[k].detach().float() for k in ("loss", "video_loss", "action_loss")])
    with timer("train: optimizer"):
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        lrs = {f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}  # the rates this step used
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if average is not None:
            average.update(model, step)
    totals /= args.grad_accum
    if proc.world > 1:
        dist.all_reduce(totals)
        totals /= proc.world
    return totals, grad_norm, lrs


def train(proc, args, model, optimizer, scheduler, dataset, start_step, average=None, record=None, timer=None):
    """The training loop from start_step to --steps (or --stop-after steps of this invocation), with
    a train_log.jsonl row every --log-every steps (losses averaged since the previous row) and a
    checkpoint every --ckpt-every steps and at the end (with `record`: its experiment and changes;
    with `average`, a WeightAverage updated after every step, saved as the checkpoint's "model").
    Returns (log rows, end step, seconds)."""
    wrapped = LossModule(model)
    if proc.world > 1:
        # action_only leaves the blocks after extract_layer without gradient: tell DDP.
        wrapped = nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[proc.device.index] if proc.device.type == "cuda" else None,
            find_unused_parameters=bool(model.config.action_only))
    log_path = os.path.join(args.out, "train_log.jsonl")
    log_rows = read_log(log_path, upto_step=start_step) if start_step > 0 else []
    end_step = args.steps if args.stop_after is None else min(args.steps, start_step + args.stop_after)
    train_start = time.time()
    step_times = []
    window = torch.zeros(4)  # loss, video_loss, action_loss sums and the step count since the last row
    bar = tqdm(range(start_step, end_step), desc="train", initial=start_step, total=args.steps,
               disable=not proc.is_main, dynamic_ncols=True)
    model.train()
    for step in bar:
        t_step = time.time()
        totals, grad_norm, lrs = train_step(proc, args, model, wrapped, optimizer, scheduler, dataset, step, average,
                                            timer)
        done = step + 1
        step_times.append(time.time() - t_step)
        if not proc.is_main:
            continue
        loss, video_loss, action_loss = totals.tolist()
        bar.set_postfix(loss=f"{loss:.4f}", video_loss=f"{video_loss:.4f}", action_loss=f"{action_loss:.4f}")
        window += torch.tensor([loss, video_loss, action_loss, 1.0])
        if len(step_times) == 4 and end_step - start_step > 4:
            per_step = sum(step_times[1:]) / 3  # the first step pays one-off costs
            tqdm.write(f"measured {per_step:.3f} s/step -> about {per_step * (end_step - done) / 60:.1f} min "
                       f"for the remaining {end_step - done} steps")
        if done % args.log_every == 0 or done == end_step or done == 1:
            mean = (window[:3] / window[3]).tolist()
            window.zero_()
            log_rows.append({"step": done, "loss": mean[0], "video_loss": mean[1], "action_loss": mean[2],
                             "grad_norm": float(grad_norm), **lrs, "seconds": round(time.time() - train_start, 2)})
            write_log(log_path, log_rows)
        if done % args.ckpt_every == 0 or done == end_step:
            with timer("checkpoints") if timer else contextlib.nullcontext():
                save_training_checkpoint(os.path.join(args.out, "checkpoint.pt"), model, optimizer, scheduler,
                                         done, dataset.state_normalizer, dataset.action_normalizer, args,
                                         average, **(record or {}))
    bar.close()
    return log_rows, end_step, time.time() - train_start


def eval_options(args):
    """evaluate()'s workers, batch and env options for the run's suite: LIBERO renders only the
    cameras the model was trained on (the dataset's features back to the suite's view names), in
    DEMO_WORKERS processes of LIBERO_EVAL_BATCH envs each; the other suites need nothing."""
    if args.suite != "libero":
        return {}
    S = suites.get_suite("libero")
    features = args.cameras or [S.CAMERA_FEATURES[S.PRIMARY[0]]]
    views = tuple(name for feature in features for name, key in S.CAMERA_FEATURES.items() if key == feature)
    return {"workers": DEMO_WORKERS, "env_options": {"cameras": views, "views": views},
            "batch_size": LIBERO_EVAL_BATCH}


def finish(args, proc, tasks, log_rows, training, timer=None):
    """On rank 0 after the loop: the loss curve; then, unless the run stopped before --steps, the
    evaluation (eval_sim's protocol: fixed seeds disjoint from the demo seeds) of the checkpoint
    just written, loaded back as any user would load it, and report.json with `training` (the
    run's figures and the time breakdown) added; prints the breakdown. Returns the report, or None
    without evaluation."""
    timer = timer or PhaseTimer(proc.device)
    draw_loss_curve(log_rows, os.path.join(args.out, "loss.png"))
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if training["end_step"] < args.steps:
        print(f"stopped at step {training['end_step']} of {args.steps}; continue with --resume {ckpt_path}")
        return None
    report = None
    if args.suite is None:  # a dataset without a simulator to evaluate in
        print("no evaluation: give --suite (with --tasks) to evaluate a --dataset run in simulation")
    elif args.eval_episodes > 0:
        t0 = time.time()
        with timer("evaluation"):
            report = eval_sim.evaluate(eval_sim.load_policy(ckpt_path, device=proc.device), tasks=tasks,
                                       episodes=args.eval_episodes, out_dir=args.out, gif_episodes=GIF_EPISODES,
                                       suite=args.suite, **eval_options(args))
        report["training"] = {
            "steps": args.steps, "train_seconds": round(training["train_seconds"], 1),
            "seconds_per_step": round(training["train_seconds"] / max(1, training["end_step"] - training["start_step"]),
                                      4),
            "eval_seconds": round(time.time() - t0, 1),
            "final_losses": next((r for r in reversed(log_rows) if "loss" in r), None),
            "world_size": proc.world, "args": vars(args), "demo_seconds": round(training["demo_seconds"], 1),
            "total_seconds": round(time.time() - training["run_start"], 1),
            "time_breakdown_seconds": {name: round(sec, 1) for name, sec in timer.seconds.items()},
        }
        atomic_write(os.path.join(args.out, "report.json"),
                             lambda f: json.dump(report, f, indent=2, default=str), mode="w")
        print(f"success {report['overall']['success_rate']:.1%} "
              f"(95% CI {report['overall']['ci95'][0]:.1%}-{report['overall']['ci95'][1]:.1%}) "
              f"over {report['overall']['n']} episodes")
    total = time.time() - training["run_start"]
    print(f"time breakdown ({total:.1f} s in all):\n{timer.report(total)}")
    print(f"wrote {os.path.abspath(args.out)} in {total / 60:.1f} min")
    return report


def main(args):
    """Checks (flags, the resumed checkpoint, the run folder), data (episodes, normalizers,
    dataset), the training loop, the finish (loss curve, evaluation, report). Returns the
    evaluation report on rank 0 (None elsewhere, or without one)."""
    run_start = time.time()
    validate_args(args)
    if args.inspect:  # --dataset PATH --inspect: what it holds, nothing else
        from bridges.lerobot import inspect

        print(inspect(args.dataset))
        return None
    if args.export_dataset:
        return export_dataset(args)
    device, amp_dtype = pick_device()
    proc = Process(device, amp_dtype, *setup_distributed(device))
    threads = args.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", proc.world)))
    torch.set_num_threads(threads)
    resume = load_resume(args) if args.resume else None  # verified, and compared with the flags
    if args.out is None:
        args.out = os.path.dirname(os.path.abspath(args.resume)) if args.resume else default_out_dir()
    if proc.world > 1:  # every rank must write into the folder rank 0 named (timestamps may differ)
        shared = [args.out]
        dist.broadcast_object_list(shared, src=0)
        args.out = shared[0]
    if proc.is_main:  # the other ranks would see rank 0's own lock
        check_out_folder(args)

    # --- data, and the experiment it makes (nothing is written into --out before this is checked)
    timer = PhaseTimer(device)
    tasks = args.tasks or (list(suites.get_suite(args.suite).TASKS) if args.suite else [])
    with timer("demos / episodes"):
        episodes, normalizers, demo_seconds = load_data(args, tasks, proc)
    config = data_config(args, episodes)
    record = experiment_record(args, config, proc.world, data_fingerprint(episodes))
    changes = []
    if resume is not None:
        changes = refuse_or_allow(args, experiment_changes(checkpoint_experiment(resume), record))
        history = list(resume.get("changes") or []) + ([{"step": int(resume["step"]), "changes": changes}]
                                                       if changes else [])
    with timer("model and dataset"):
        model, state_normalizer, action_normalizer = model_and_normalizers(config, args, episodes, resume,
                                                                           normalizers)
        dataset = EpisodeDataset(episodes, config.num_future_frames, config.action_horizon,
                                 state_normalizer, action_normalizer, early_weight=args.early_weight)
    model.to(device)
    optimizer, scheduler = make_optimizer(model, args)
    start_step = 0
    if resume is not None:  # the training state this script added to the checkpoint
        try:
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
        except (ValueError, KeyError) as err:
            raise ValueError(f"--resume: the optimizer state in {args.resume} does not fit this model: {err}") from None
        if changes:
            apply_schedule(optimizer, scheduler, args)
        start_step = int(resume["step"])
    average = None
    if args.ema_decay > 0:  # resumed: from the checkpoint's average ("model"), when it kept one
        start = resume["model"] if resume is not None and "training_weights" in resume else None
        average = WeightAverage(model, args.ema_decay, start)

    lock = claim_out_folder(args) if proc.is_main else None
    try:
        if proc.is_main:
            print(f"run folder: {os.path.abspath(args.out)}  ({device}, {'bf16 autocast' if amp_dtype else 'fp32'}, "
                  f"{proc.world} process(es) x {threads} thread(s))")
            print(f"{len(episodes)} episodes, {len(dataset)} samples, frames {episodes[0]['frames'].shape[1]}px, "
                  f"K={config.action_horizon} F={config.num_future_frames} stride={dataset.stride}")
            n_params = sum(p.numel() for p in model.parameters())
            print(f"preset {args.preset}: {n_params / 1e6:.2f} M parameters"
                  + (f"; resuming at step {start_step} (model config from the checkpoint)" if resume else ""))
            if changes:
                print(f"--allow-changes: continuing with {', '.join(changes)}")
                log_path = os.path.join(args.out, "train_log.jsonl")
                write_log(log_path, read_log(log_path, upto_step=start_step) + [
                    {"step": start_step, "event": "resume --allow-changes", "checkpoint": args.resume,
                     "changes": changes}])

        # --- the training loop
        log_rows, end_step, train_seconds = train(
            proc, args, model, optimizer, scheduler, dataset, start_step, average,
            record={"experiment": record, "changes": history if resume is not None else []}, timer=timer)
        barrier()
        if dist.is_initialized():
            dist.destroy_process_group()

        # --- finish
        if not proc.is_main:
            return None
        return finish(args, proc, tasks, log_rows, dict(run_start=run_start, demo_seconds=demo_seconds,
                                                        start_step=start_step, end_step=end_step,
                                                        train_seconds=train_seconds), timer)
    finally:
        if lock is not None:
            release_out_folder(lock)


# ----------------------------------------------------------------------------------------------
# Command line

def check_data_flags(args):
    """Where the episodes come from: demos collected in --suite (default toy), episode files
    (--data), or a LeRobot dataset (--dataset); --export-dataset writes the demos and stops."""
    sources = [flag for flag, value in (("--data", args.data), ("--dataset", args.dataset),
                                        ("--export-dataset", args.export_dataset)) if value]
    if len(sources) > 1:
        raise ValueError(f"{' and '.join(sources)}: give at most one source of episodes")
    if args.inspect and not args.dataset:
        raise ValueError("--inspect describes a LeRobot dataset: give --dataset PATH")
    if args.cameras and not args.dataset and args.suite not in DATASET_SUITES:
        raise ValueError("--cameras chooses the cameras of a LeRobot --dataset (or of --suite libero's demos): "
                         "give --dataset PATH")
    if args.export_dataset and args.resume:
        raise ValueError("--export-dataset writes the suite's demos and stops: it cannot be combined with --resume")
    if args.dataset and not os.path.isfile(os.path.join(args.dataset, "meta", "info.json")):
        raise FileNotFoundError(f"--dataset: {args.dataset!r} is not a LeRobot dataset (no meta/info.json)")
    if args.suite is None and not args.dataset:
        args.suite = "toy"


def export_dataset(args):
    """--export-dataset PATH: the suite's scripted demos (collected or cached as for training)
    written as one LeRobot v3.0 dataset, atomically; nothing is trained."""
    from bridges.lerobot import write_lerobot_v3  # needs pyarrow and av: pip install -e .[data]

    suite = suites.get_suite(args.suite)
    tasks = args.tasks or list(suite.TASKS)
    if args.suite in DATASET_SUITES:  # its demos are a LeRobot dataset from the start
        if os.path.lexists(args.export_dataset):
            raise FileExistsError(f"--export-dataset: {args.export_dataset} exists; not replacing it")
        collect_dataset(tasks, args.demos_per_task, args.export_dataset, suite=args.suite)
        return None
    image_size = args.image_size or dit4dit.make_config(args.preset).image_size
    cache = args.demo_cache or os.path.join(os.path.dirname(os.path.abspath(args.export_dataset)), "demos")
    episodes = collect_demos(tasks, args.demos_per_task, image_size, cache, every_pad=args.every_pad,
                             suite=args.suite, noise=args.demo_noise)
    path = write_lerobot_v3(args.export_dataset, episodes, fps=round(1 / suite.CONTROL_DT),
                            robot_type=f"dit4dit-{args.suite}")
    print(f"wrote {len(episodes)} episodes of {', '.join(tasks)} as LeRobot v3.0 to {path}")
    return None


def validate_args(args):
    """Every flag on its own and the config they make, before any work (no demo, no folder)."""
    positive = ["steps", "batch_size", "grad_accum", "demos_per_task", "ckpt_every", "log_every"]
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("threads", "image_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_data_flags(args)
    if args.demo_noise is None:  # the toy suite's DART noise; Meta-World's demos as its experts act
        args.demo_noise = DEMO_NOISE if args.suite == "toy" else 0.0
    if not (math.isfinite(args.demo_noise) and args.demo_noise >= 0):
        raise ValueError(f"--demo-noise must be a finite number >= 0, got {args.demo_noise}")
    if not 0 <= args.ema_decay < 1:
        raise ValueError(f"--ema-decay must be in [0, 1) (0: no weight average), got {args.ema_decay}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.overwrite and args.resume is not None:
        raise ValueError("--overwrite starts a new run in --out; it cannot be combined with --resume")
    for name in ("lr_video", "lr_action"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.eval_episodes is None:
        args.eval_episodes = LIBERO_EVAL_EPISODES if args.suite == "libero" else EVAL_EPISODES
    if args.eval_episodes < 0:
        raise ValueError(f"--eval-episodes must be >= 0, got {args.eval_episodes}")
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {args.stop_after}")
    if args.preset not in dit4dit.PRESETS:
        raise ValueError(f"--preset: unknown preset {args.preset!r}; choose from {sorted(dit4dit.PRESETS)}")
    if args.suite is None:  # a --dataset run evaluates nowhere unless a suite is named
        if args.tasks:
            raise ValueError("--tasks names tasks of a suite: give --suite too (a --dataset run has none)")
        return
    suite = suites.get_suite(args.suite)  # Meta-World: a clear error when it is not installed
    if args.libero_suite is not None:
        if args.suite != "libero" or args.tasks:
            raise ValueError("--libero-suite names the tasks of --suite libero: give it with --suite libero, "
                             "instead of --tasks")
        args.tasks = suite.suite_tasks(args.libero_suite)
    if args.suite == "libero" and args.cameras:
        known = list(suite.CAMERA_FEATURES.values())
        if any(c not in known for c in args.cameras):
            raise ValueError(f"--cameras: LIBERO's demo datasets have the cameras {known}, got {args.cameras}")
    if args.suite != "toy" and not args.tasks:
        raise ValueError(f"--suite {args.suite}: name the tasks to train on with --tasks (e.g. reach-v3 push-v3)")
    for task in args.tasks or []:
        if task not in suite.TASKS:
            raise ValueError(f"--tasks: unknown task {task!r}; choose from {sorted(suite.TASKS)}")
    if args.data is not None and not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data: {args.data!r} is not a directory")
    # the config's own checks of the flags (and of --image-size against the patch), before any demo
    build_config(args, **({} if args.image_size is None else {"image_size": args.image_size}))
    if args.resume is not None and os.path.isdir(args.resume):
        raise IsADirectoryError(f"--resume: {args.resume} is a directory; give the checkpoint file "
                                f"(such as {os.path.join(args.resume, 'checkpoint.pt')})")
    if args.resume is not None and not os.path.isfile(args.resume):
        raise FileNotFoundError(f"--resume: no checkpoint at {args.resume!r}")


def build_parser():
    p = argparse.ArgumentParser(description="Train DiT4DiT on the MuJoCo toy suite and evaluate it.")
    p.add_argument("--preset", default=PRESET, help=f"model preset from dit4dit.PRESETS (default {PRESET})")
    p.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps (default {STEPS})")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help=f"samples per micro-step per process (default {BATCH_SIZE})")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default 1)")
    p.add_argument("--lr-video", type=float, default=LR_VIDEO,
                   help=f"peak learning rate of the video DiT and text encoder (default {LR_VIDEO})")
    p.add_argument("--lr-action", type=float, default=LR_ACTION,
                   help=f"peak learning rate of the action DiT (default {LR_ACTION})")
    p.add_argument("--warmup", type=int, default=WARMUP, help=f"warm-up steps, at most steps/10 (default {WARMUP})")
    p.add_argument("--ema-decay", type=float, default=EMA_DECAY,
                   help=f"decay of the weight average saved and evaluated as the model (default {EMA_DECAY}; 0: off)")
    p.add_argument("--video-loss-weight", type=float, default=None,
                   help="λ in L = L_action + λ·L_video (default: the preset's)")
    p.add_argument("--repeat", type=int, default=None, help="R, action-noise draws per sample (default: the preset's)")
    p.add_argument("--extract-layer", type=int, default=None,
                   help="0-based video block whose tokens feed the action DiT (default: the preset's)")
    p.add_argument("--detach-features", action=argparse.BooleanOptionalAction, default=None,
                   help="stop the action loss at the features (release) or let it train the video DiT "
                        "(paper) (default: the preset's)")
    p.add_argument("--action-only", action="store_true", default=None,
                   help="ablation baseline: no video loss; the action loss trains the video DiT through the features")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init, data order and noise (default 0)")
    p.add_argument("--out", default=None, help="run folder (default runs/<timestamp>, or the resumed checkpoint's)")
    p.add_argument("--resume", default=None, metavar="PATH",
                   help="continue exactly from this checkpoint (give the flags it was trained with)")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue even though flags or data differ from the checkpoint's "
                        "(the differences are written into train_log.jsonl and the checkpoint)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that holds one (its checkpoint, log, report and loss "
                        "curve are deleted first)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N steps of this invocation (time-sliced jobs); the schedule follows --steps")
    p.add_argument("--ckpt-every", type=int, default=CKPT_EVERY,
                   help=f"steps between checkpoints (default {CKPT_EVERY}; always at the end)")
    p.add_argument("--log-every", type=int, default=LOG_EVERY,
                   help=f"steps between train_log.jsonl rows (default {LOG_EVERY})")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="train on episode .npz files under DIR instead of collecting demos")
    p.add_argument("--demo-cache", default=None, metavar="DIR", help="demo cache folder (default <out>/../demos)")
    p.add_argument("--demos-per-task", type=int, default=DEMOS_PER_TASK,
                   help=f"scripted-expert demo layouts per task (default {DEMOS_PER_TASK})")
    p.add_argument("--early-weight", type=int, default=EARLY_WEIGHT,
                   help="draw the samples of each demo's first K/2 steps this many times as often "
                        f"(default {EARLY_WEIGHT}; 1 = uniform)")
    p.add_argument("--every-pad", action=argparse.BooleanOptionalAction, default=EVERY_PAD,
                   help="demonstrate each layout toward every pad, one episode per pad (default on); "
                        "--no-every-pad: one episode per layout")
    p.add_argument("--demo-noise", type=float, default=None,
                   help="std of the noise added to the expert's executed commands while collecting demos; the "
                        f"demos record the clean commands (DART) (default {DEMO_NOISE} on the toy suite, 0 on Meta-World)")
    p.add_argument("--image-size", type=int, default=None, help="rendered frame size (default: the preset's)")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="tasks of the suite (default: all of the toy suite's; required with --suite metaworld)")
    p.add_argument("--dataset", default=None, metavar="PATH",
                   help="train on a LeRobot v2.x/v3.0 dataset (pip install -e .[data]); no evaluation unless "
                        "--suite is given")
    p.add_argument("--cameras", nargs="+", default=None, metavar="KEY",
                   help="with --dataset: camera features to use, tiled side by side (default: the first)")
    p.add_argument("--inspect", action="store_true",
                   help="with --dataset: print its episodes, frames, tasks, features and fps, then stop")
    p.add_argument("--export-dataset", default=None, metavar="PATH",
                   help="write the suite's scripted demos as a LeRobot v3.0 dataset at PATH, then stop")
    p.add_argument("--suite", default=None, choices=suites.SUITES,
                   help="the suite to collect demos in and evaluate on: toy (default; none with --dataset), "
                        "metaworld (pip install metaworld; see suites/metaworld.py) or libero (scripted demos "
                        "written as a LeRobot dataset; see suites/libero.py)")
    p.add_argument("--eval-episodes", type=int, default=None,
                   help=f"evaluation episodes per task, 0 skips evaluation (default {EVAL_EPISODES}; LIBERO: "
                        f"{LIBERO_EVAL_EPISODES}, its first init states)")
    p.add_argument("--libero-suite", default=None, metavar="NAME",
                   help="--suite libero: train and evaluate on all tasks of this suite (libero_object, "
                        "libero_spatial, libero_goal, libero_10, libero_90), instead of --tasks")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (default: cores / processes on this machine)")
    return p


def cli(argv=None):
    """The command line: bad flags and missing or corrupt files exit with one clear line."""
    try:
        return main(build_parser().parse_args(argv))
    except (ValueError, FileNotFoundError, IsADirectoryError, FileExistsError, ModuleNotFoundError) as error:
        sys.exit(f"train_toy.py: error: {error}")


if __name__ == "__main__":
    cli()
