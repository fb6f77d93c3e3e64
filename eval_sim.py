"""The closed-loop evaluation harness: expert episodes, policies (scripted experts, a DiT4DiT
checkpoint), the rollout loop shared by every suite, the evaluation protocol, the JSON report and
rollout GIFs. The simulated tasks themselves live in suites/.

    python eval_sim.py --expert                          # the scripted experts: the ceiling
    python eval_sim.py --ckpt runs/x/checkpoint.pt       # a trained policy, 50 episodes per task
    python eval_sim.py --ckpt C --tasks push --episodes 20 --gifs 3 --out runs/x/eval
    python eval_sim.py --bench                           # time one control step (physics + render)
    python eval_sim.py --suite metaworld --expert --tasks reach-v3 push-v3   # Meta-World

Evaluation (docs/design.md §5.2): fixed seeds (suites.EVAL_SEEDS) disjoint from the demo seeds
(suites.DEMO_SEEDS), success per task and overall with 95 % Wilson intervals, a JSON report
with a manifest, rollout GIFs (imagined future frames beside the real ones for DiT4DiT), and an
environment error in one episode recorded as a failed episode while the evaluation goes on.
"""
import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
import zlib

import numpy as np

import suites  # first: it sets MUJOCO_GL and the import order before mujoco loads
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from bridges.checkpoint import load_checkpoint, model_from_checkpoint
from bridges.files import atomic_write, file_sha256
from bridges.frames import frames_to_video, video_to_frames

# ----------------------------------------------------------------------------------------------
# Expert episodes: what train_toy.py collects as demos.

def collect_episode(task, seed, image_size=64, target=None, suite="toy", noise=0.0):
    """One scripted-expert episode as bridges/episodes.py stores it. `target` (a pad index) names
    another pad than the seed draws, so one layout can be demonstrated toward every pad.

    noise > 0 (DART, Laskey et al. 2017): the env executes the expert's command plus Gaussian
    noise of this std per action dimension (clipped to [-1, 1]), while the episode records the
    expert's own command. The demos then visit the states a learner's small errors lead to (an
    end-effector off the push line, or past the puck) and show how the expert recovers from them.
    The noise is drawn from (seed, target): the same call gives the same episode.
    A suite whose observations carry the cameras' own frames (LIBERO's obs["views"]) adds
    "cameras": {dataset feature key: uint8 (T+1, H, W, 3)}, what a LeRobot dataset of it stores."""
    S = suites.get_suite(suite)
    env = S.make_env(task, image_size=image_size)
    rng = np.random.default_rng([int(seed), 0 if target is None else int(target) + 1,
                                 zlib.crc32(task.encode())])
    try:
        obs, info = env.reset(seed=seed, options={"target": target})
        expert = S.scripted_expert(env)
        frames, states, actions = [obs["image"]], [obs["state"]], []
        views = {name: [frame] for name, frame in obs.get("views", {}).items()}  # LIBERO: the datasets' cameras
        while True:
            action = expert(obs)
            executed = action if noise == 0 else np.clip(
                action + noise * rng.standard_normal(action.shape), -1.0, 1.0).astype(action.dtype)
            obs, _, terminated, truncated, info = env.step(executed)
            frames.append(obs["image"])
            for name, frame in obs.get("views", {}).items():
                views[name].append(frame)
            states.append(obs["state"])
            actions.append(action)
            if terminated or truncated:
                success = info["success"]
                break
        episode = {"frames": np.stack(frames), "state": np.stack(states).astype(np.float32),
                   "action": np.stack(actions).astype(np.float32), "instruction": env.unwrapped.instruction,
                   "task": task, "seed": int(seed), "success": bool(success)}
        if views:  # keyed by the dataset feature each camera is stored as
            episode["cameras"] = {S.CAMERA_FEATURES[name]: np.stack(f) for name, f in views.items()}
        return episode
    finally:
        env.close()


# ----------------------------------------------------------------------------------------------
# Policies behind one interface, so that one rollout loop serves every environment family:
#   reset(envs, gif_rows=(), seed=0)   a new batch of episodes, one per env (rows)
#   act(rows, observations) -> (len(rows), A) float32 actions for those rows
#   imagined: dict row -> uint8 (F, H, W, 3) future frames the policy imagined at its last plan
#   describe() -> dict for the report's manifest

class ExpertPolicy:
    """The scripted experts (privileged physical state): the ceiling of the suite.
    make_expert: env -> expert, a suite's scripted_expert (default: the toy suite's)."""

    def __init__(self, make_expert=None):
        self._make_expert = make_expert or suites.get_suite("toy").scripted_expert

    def reset(self, envs, gif_rows=(), seed=0):
        self._experts = [self._make_expert(env) for env in envs]
        self.imagined = {}

    def act(self, rows, observations):
        return np.stack([self._experts[r](obs) for r, obs in zip(rows, observations)]).astype(np.float32)

    def describe(self):
        return {"policy": "scripted_expert"}


class ZeroPolicy:
    """Zero actions: the smoke test of a suite's loop (LIBERO: arm still; its gripper closes in the
    datasets' convention, 0 = close)."""

    def reset(self, envs, gif_rows=(), seed=0):
        self._dims = [env.action_space.shape[0] for env in envs]
        self.imagined = {}

    def act(self, rows, observations):
        return np.stack([np.zeros(self._dims[r], np.float32) for r in rows])

    def describe(self):
        return {"policy": "zero"}


class ModelPolicy:
    """A DiT4DiT model acting in closed loop with a receding horizon: at a re-plan it predicts a
    chunk of K actions from (frame, state, instruction), executes the first `execute_steps` of
    them, then re-plans from the new observation. Episodes of a batch re-plan together, in one
    predict_action call. For GIF rows it also runs model.imagine_video at each re-plan."""

    def __init__(self, model, state_normalizer, action_normalizer, execute_steps=None):
        cfg = model.config
        self.model = model.eval()
        self.state_normalizer, self.action_normalizer = state_normalizer, action_normalizer
        self.execute_steps = cfg.action_horizon // 2 if execute_steps is None else int(execute_steps)
        if not 1 <= self.execute_steps <= cfg.action_horizon:
            raise ValueError(f"execute_steps must be in [1, action_horizon={cfg.action_horizon}], "
                             f"got {execute_steps}")
        self.image_size = cfg.image_size
        self.checkpoint = None  # set by load_policy: path, sha256, step
        self.reset([])

    def reset(self, envs, gif_rows=(), seed=0):
        self._envs = list(envs)
        self._plans = [[] for _ in self._envs]  # row -> actions still to execute
        self._gif_rows = set(gif_rows)
        self.imagined = {}
        device = next(self.model.parameters()).device
        # One stream for the action noise, another for imagination: GIFs do not change actions.
        self._gen_action = torch.Generator(device=device).manual_seed(int(seed))
        self._gen_video = torch.Generator(device=device).manual_seed(int(seed) + 1)

    def act(self, rows, observations):
        replan = [(r, obs) for r, obs in zip(rows, observations) if not self._plans[r]]
        if replan:
            self._plan([r for r, _ in replan], [obs for _, obs in replan])
        return np.stack([self._plans[r].pop(0) for r in rows])

    @torch.no_grad()
    def _plan(self, rows, observations):
        device = next(self.model.parameters()).device
        images = np.stack([obs["image"] for obs in observations])                 # (B, H, W, 3) uint8
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"observation image {images.shape[1:3]} does not match the model's "
                             f"image_size={self.image_size}")
        video = frames_to_video(images[:, None])                          # (B, 3, 1, H, W)
        frame = video[:, :, 0].to(device)                                         # (B, 3, H, W)
        state = torch.as_tensor(np.stack([obs["state"] for obs in observations]))  # (B, P)
        state = self.state_normalizer.normalize(state).float().to(device)
        text = [self._envs[r].unwrapped.instruction for r in rows]
        chunk = self.model.predict_action(frame, state, text, generator=self._gen_action)  # (B, K, A)
        env_dim = self._envs[rows[0]].action_space.shape[0]
        chunk = self.action_normalizer.unnormalize(chunk[:, :, :env_dim].float().cpu()).numpy()
        for r, actions in zip(rows, chunk):
            self._plans[r] = [np.clip(a, -1.0, 1.0).astype(np.float32) for a in actions[: self.execute_steps]]
        gif = [i for i, r in enumerate(rows) if r in self._gif_rows]
        if gif:
            imagined = self.model.imagine_video(frame[gif], [text[i] for i in gif], generator=self._gen_video)
            imagined = video_to_frames(imagined)                           # (b, 1+F, H, W, 3)
            for i, frames in zip(gif, imagined):
                self.imagined[rows[i]] = frames[1:]

    def describe(self):
        return {"policy": "dit4dit", "config": dataclasses.asdict(self.model.config),
                "execute_steps": self.execute_steps, "checkpoint": self.checkpoint}


def load_policy(path, execute_steps=None, device="cpu", action_noise_scale=None):
    """ModelPolicy from a checkpoint written by bridges.checkpoint.save_checkpoint (train_toy.py's);
    action_noise_scale replaces the checkpoint config's (the sampler's starting-noise std)."""
    ckpt = load_checkpoint(path)  # FileNotFoundError / ValueError naming the file
    if action_noise_scale is not None:  # checked with the rest of the config by model_from_checkpoint
        ckpt = {**ckpt, "config": {**ckpt["config"], "action_noise_scale": action_noise_scale}}
    model, state_normalizer, action_normalizer = model_from_checkpoint(ckpt)
    policy = ModelPolicy(model.to(device), state_normalizer, action_normalizer, execute_steps)
    policy.checkpoint = {"path": os.path.abspath(path), "sha256": file_sha256(path), "step": ckpt.get("step")}
    policy.spec = ("checkpoint", os.path.abspath(path), execute_steps, device, action_noise_scale)
    return policy


def policy_from_spec(spec, suite):
    """The policy a worker process rebuilds from a picklable spec: ("expert",), ("zero",) or
    ("checkpoint", path, execute_steps, device, action_noise_scale)."""
    if spec[0] == "expert":
        return ExpertPolicy(suites.get_suite(suite).scripted_expert)
    if spec[0] == "zero":
        return ZeroPolicy()
    _, path, execute_steps, device, noise = spec
    return load_policy(path, execute_steps=execute_steps, device=device, action_noise_scale=noise)


def policy_spec(policy):
    if isinstance(policy, ExpertPolicy):
        return ("expert",)
    if isinstance(policy, ZeroPolicy):
        return ("zero",)
    if getattr(policy, "spec", None) is None:
        raise ValueError("workers > 1: the policy must be the experts, the zero policy or a checkpoint "
                         "(load_policy), which each worker process loads again")
    return policy.spec


# ----------------------------------------------------------------------------------------------
# The rollout loop, shared by every environment family (gymnasium API, instruction on
# env.unwrapped.instruction, info["success"], the env's own step limit as truncation).

def run_episodes(envs, seeds, policy, record=()):
    """One episode per env, in lockstep, so a model policy plans for the whole batch at once.
    An exception raised by an env ends that episode as a failure with its error; the others go on.
    Returns one dict per env: seed, instruction, success, steps, error, and for rows in `record`
    `frames`: list of (real frame, imagined future frames or None)."""
    results = [{"seed": int(s), "instruction": "", "success": False, "steps": 0, "error": None} for s in seeds]
    obs, active = [None] * len(envs), [False] * len(envs)
    for r, (env, seed) in enumerate(zip(envs, seeds)):
        try:
            obs[r], _ = env.reset(seed=int(seed))
            results[r]["instruction"] = env.unwrapped.instruction
            active[r] = True
        except Exception as err:
            results[r]["error"] = f"{type(err).__name__}: {err}"
    for r in record:
        results[r]["frames"] = []
    policy.reset(envs, gif_rows=record, seed=int(seeds[0]))
    env_seconds, env_steps = 0.0, 0
    while any(active):
        rows = [r for r in range(len(envs)) if active[r]]
        actions = policy.act(rows, [obs[r] for r in rows])
        for r, action in zip(rows, actions):
            if "frames" in results[r]:
                results[r]["frames"].append((obs[r]["image"], policy.imagined.get(r)))
            t0 = time.perf_counter()
            try:
                obs[r], _, terminated, truncated, info = envs[r].step(action)
            except Exception as err:
                results[r]["error"] = f"{type(err).__name__}: {err}"
                active[r] = False
                continue
            env_seconds += time.perf_counter() - t0
            env_steps += 1
            results[r]["steps"] += 1
            if terminated or truncated:
                results[r]["success"] = bool(info["success"])
                active[r] = False
                if "frames" in results[r]:
                    results[r]["frames"].append((obs[r]["image"], policy.imagined.get(r)))
    return results, env_seconds, env_steps


def write_gif(path, frames, display_size=192):
    """Rollout GIF: the real frame, and beside it (DiT4DiT) the future frames imagined at the
    last re-plan; `frames` is a list of (real uint8 (H, W, 3), imagined uint8 (F, H, W, 3) or None).
    Frames are upscaled (nearest neighbour) to about `display_size` pixels to be visible."""
    H, W = frames[0][0].shape[:2]
    scale = max(1, round(display_size / H))
    F = max((len(im) for _, im in frames if im is not None), default=0)
    h, w, gap, top = H * scale, W * scale, 4, 14
    images = []
    for real, imagined in frames:
        canvas = Image.new("RGB", (w + F * (w + gap), h + top), "white")
        canvas.paste(Image.fromarray(real).resize((w, h), Image.NEAREST), (0, top))
        draw = ImageDraw.Draw(canvas)
        draw.text((2, 1), "real", fill="black")
        if F:
            draw.text((w + gap + 2, 1), "imagined at the last re-plan", fill="black")
            for i, frame in enumerate(imagined if imagined is not None else []):
                canvas.paste(Image.fromarray(frame).resize((w, h), Image.NEAREST), (w + gap + i * (w + gap), top))
        images.append(canvas)
    images[0].save(path, save_all=True, append_images=images[1:], duration=150, loop=0)


# ----------------------------------------------------------------------------------------------
# Evaluation protocol (docs/design.md §5.2)

def wilson_interval(successes, n, z=1.959963984540054):
    """95 % Wilson score interval (low, high) for `successes` out of `n` trials."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else center - half    # exact bounds at the ends (no rounding residue)
    high = 1.0 if successes == n else center + half
    return (low, high)


def git_commit():
    """HEAD of the repository holding this file, or None outside git / before the first commit."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_versions(suite="toy"):
    import gymnasium
    import mujoco
    import PIL

    versions = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                "mujoco": mujoco.__version__, "gymnasium": gymnasium.__version__, "pillow": PIL.__version__}
    from importlib.metadata import version

    for name in {"metaworld": ["metaworld"], "libero": ["hf-libero", "robosuite"]}.get(suite, []):
        versions[name] = version(name)
    return versions


def _run_unit(suite, task, seeds, record, image_size, env_options, policy, threads=None):
    """One batch of episodes of one task, in lockstep, on envs made here and closed after; policy is
    a policy, or a spec to rebuild one (in a worker process). -> (results, env s, env steps, s)."""
    if threads:
        torch.set_num_threads(threads)
    S = suites.get_suite(suite)
    if isinstance(policy, tuple):
        policy = policy_from_spec(policy, suite)
    envs = [S.make_env(task, image_size=image_size, **env_options) for _ in seeds]
    try:
        t0 = time.perf_counter()
        results, secs, steps = run_episodes(envs, seeds, policy, record=record)
        return results, secs, steps, time.perf_counter() - t0
    finally:
        for env in envs:
            env.close()


def _summary(successes, n):
    low, high = wilson_interval(successes, n)
    return {"success_rate": successes / n, "ci95": [low, high], "successes": successes, "n": n}


def evaluate(policy, tasks=None, episodes=50, out_dir="out", gif_episodes=2, image_size=None,
             batch_size=10, progress=True, suite="toy", workers=1, env_options=None, first_episode=0):
    """Closed-loop evaluation of `policy` ("expert", "zero", an ExpertPolicy, a ZeroPolicy or a
    ModelPolicy) on `episodes` fixed evaluation seeds per task of `suite`, from the
    `first_episode`-th on (0: the first; a later start gives seeds never looked at before).
    Batches of up to `batch_size` episodes of a task run in lockstep; with workers > 1 the batches
    are spread over that many processes, each with its own envs and its own copy of the policy.
    env_options go to the suite's make_env. Writes out_dir/report.json and the GIFs of the first `gif_episodes`
    episodes of each task under out_dir/gifs/; returns the report dict."""
    started, wall0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    S = suites.get_suite(suite)
    if policy == "expert":
        policy = ExpertPolicy(S.scripted_expert)
    elif policy == "zero":
        policy = ZeroPolicy()
    env_options = dict(env_options or {})
    if not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    tasks = [S.get_task(task).name for task in (S.TASKS if tasks is None else tasks)]  # canonical names
    for name, value, low in (("episodes", episodes, 1), ("batch_size", batch_size, 1),
                             ("gif_episodes", gif_episodes, 0), ("first_episode", first_episode, 0)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    model_state_dim = getattr(getattr(getattr(policy, "model", None), "config", None), "state_dim", None)
    if model_state_dim is not None and model_state_dim != S.STATE_DIM:
        raise ValueError(f"the model takes a state of {model_state_dim} numbers but the {suite} suite gives "
                         f"{S.STATE_DIM}: evaluate it on the suite it was trained on (--suite)")
    model_size = getattr(policy, "image_size", None)
    if image_size is None:
        image_size = model_size or 64
    if model_size is not None and image_size != model_size:
        raise ValueError(f"image_size={image_size} differs from the model's image_size={model_size}")
    os.makedirs(out_dir, exist_ok=True)

    report_episodes, per_task, seeds_used = [], {}, {}
    env_seconds, env_steps, rollout_seconds = 0.0, 0, 0.0
    units = []  # (task, seeds, GIF rows): a batch of one task's episodes, run in lockstep
    for task in tasks:
        seeds_used[task] = S.eval_seeds(task, first_episode + episodes)[first_episode:]
        for start in range(0, episodes, batch_size):
            batch = seeds_used[task][start:start + batch_size]
            units.append((task, batch, [r for r in range(len(batch)) if start + r < gif_episodes]))
    successes = {task: 0 for task in tasks}
    bar = tqdm(total=episodes * len(tasks), desc=f"eval {suite}", unit="ep", disable=not progress)

    def collect(task, results, secs, steps, seconds):
        nonlocal env_seconds, env_steps, rollout_seconds
        rollout_seconds += seconds
        env_seconds, env_steps = env_seconds + secs, env_steps + steps
        for res in results:
            entry = {"task": task, **{k: v for k, v in res.items() if k != "frames"}}
            if hasattr(S, "init_state_index"):  # LIBERO: the benchmark's fixed init state
                entry["init_state"] = S.init_state_index(res["seed"])
            if "frames" in res and res["frames"]:
                os.makedirs(os.path.join(out_dir, "gifs"), exist_ok=True)
                entry["gif"] = os.path.join("gifs", f"{task.replace('/', '_')}_seed{res['seed']}.gif")
                write_gif(os.path.join(out_dir, entry["gif"]), res["frames"])
            report_episodes.append(entry)
            successes[task] += res["success"]
        bar.update(len(results))
        bar.set_postfix(success=f"{sum(successes.values())}/{len(report_episodes)}")

    try:
        if workers == 1:
            for task, batch, record in units:
                collect(task, *_run_unit(suite, task, batch, record, image_size, env_options, policy))
        else:  # "spawn": no GL context or torch thread pool is inherited
            import concurrent.futures
            import multiprocessing

            spec, threads = policy_spec(policy), max(1, (os.cpu_count() or 1) // workers)
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [(task, pool.submit(_run_unit, suite, task, batch, record, image_size, env_options,
                                              spec, threads)) for task, batch, record in units]
                for task, future in futures:  # in order, so the report does not depend on timing
                    collect(task, *future.result())
    finally:
        bar.close()
    report_episodes.sort(key=lambda e: (tasks.index(e["task"]), seeds_used[e["task"]].index(e["seed"])))
    for task in tasks:
        per_task[task] = _summary(successes[task], episodes)

    total = sum(t["successes"] for t in per_task.values())
    report = {
        "overall": _summary(total, episodes * len(tasks)),
        "tasks": per_task,
        "episodes": report_episodes,
        "manifest": {
            "git_commit": git_commit(),
            "started": started,
            "command": sys.argv,
            "config": {"suite": suite, "tasks": tasks, "episodes_per_task": episodes,
                       "first_episode": first_episode, "image_size": image_size,
                       "batch_size": batch_size, "workers": workers, "env_options": env_options,
                       "control_hz": 1 / S.CONTROL_DT, "physics_dt": S.PHYSICS_DT,
                       "substeps": S.SUBSTEPS, "max_steps": {t: S.TASKS[t].max_steps for t in tasks},
                       **policy.describe()},
            "seeds": seeds_used,
            "packages": package_versions(suite),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "mujoco_gl": os.environ.get("MUJOCO_GL")},
            "wall_seconds": round(time.perf_counter() - wall0, 2),
            "control_hz_achieved": round(env_steps / rollout_seconds, 2) if rollout_seconds else None,
            "env_step_ms": round(1000 * env_seconds / env_steps, 3) if env_steps else None,
            "env_steps": env_steps,
        },
    }
    atomic_write(os.path.join(out_dir, "report.json"), lambda f: json.dump(report, f, indent=2), mode="w")
    return report


def benchmark_control_step(task, image_size=64, steps=300, suite="toy"):
    """Wall time of one control step (SUBSTEPS physics steps + one rendered frame) under random
    actions: (median ms, mean ms). A measurement to print, never to assert."""
    S = suites.get_suite(suite)
    env = S.make_env(task, image_size=image_size)
    rng, times = np.random.default_rng(0), []
    try:
        env.reset(seed=suites.EVAL_SEEDS[0])
        for i in range(steps):
            action = rng.uniform(-1, 1, S.ACTION_DIM).astype(np.float32)
            t0 = time.perf_counter()
            _, _, terminated, truncated, _ = env.step(action)
            times.append(time.perf_counter() - t0)
            if terminated or truncated:
                env.reset(seed=suites.EVAL_SEEDS[i + 1])
    finally:
        env.close()
    return 1000 * float(np.median(times)), 1000 * float(np.mean(times))


# ----------------------------------------------------------------------------------------------
# Command line

def main(args):
    S = suites.get_suite(args.suite)
    if args.bench:
        if args.suite != "toy" and not args.tasks:
            raise ValueError(f"--bench --suite {args.suite}: name the tasks to time with --tasks")
        for task in args.tasks or S.TASKS:
            S.get_task(task)
            median, mean = benchmark_control_step(task, args.image_size or 64, suite=args.suite)
            print(f"{task:>8}: control step (physics x{S.SUBSTEPS} + one {args.image_size or 64}px frame) "
                  f"median {median:.2f} ms, mean {mean:.2f} ms  (MUJOCO_GL={os.environ.get('MUJOCO_GL')})")
        return None
    if args.expert:
        args.policy = args.policy or "expert"
    if (args.policy is not None) == (args.ckpt is not None) or args.policy not in (None, "expert", "zero"):
        raise ValueError("give exactly one of --ckpt PATH (a trained policy), --expert / --policy expert (the "
                         "scripted experts) or --policy zero (zero actions, a smoke test)")
    env_options = {}
    if args.suite == "libero":
        if args.tasks and args.libero_suite:
            raise ValueError("give --tasks or --libero-suite, not both")
        if not args.tasks:
            args.tasks = S.suite_tasks(args.libero_suite or "libero_spatial")
        env_options["render_quality"] = args.libero_render
        if args.libero_render == "none":  # no frames: only the scripted experts can act, and no GIF is made
            if args.policy != "expert":
                raise ValueError("--libero-render none renders nothing: only --policy expert can be evaluated so")
            args.gifs = 0
    elif args.libero_suite or args.libero_render != "dataset":
        raise ValueError("--libero-suite and --libero-render are options of --suite libero")
    for task in args.tasks or []:  # before a checkpoint is loaded
        S.get_task(task)
    if args.policy == "expert":
        policy = ExpertPolicy(S.scripted_expert)
    elif args.policy == "zero":
        policy = ZeroPolicy()
    else:
        if os.path.isdir(args.ckpt):
            raise IsADirectoryError(f"--ckpt: {args.ckpt} is a directory; give the checkpoint file "
                                    f"(such as {os.path.join(args.ckpt, 'checkpoint.pt')})")
        if not os.path.isfile(args.ckpt):
            raise FileNotFoundError(f"--ckpt: checkpoint {args.ckpt} does not exist")
        torch.set_num_threads(args.threads or torch.get_num_threads())
        policy = load_policy(args.ckpt, execute_steps=args.execute_steps,  # verified: errors name the file
                             action_noise_scale=args.action_noise_scale)
    report = evaluate(policy, tasks=args.tasks, episodes=args.episodes, out_dir=args.out, gif_episodes=args.gifs,
                      image_size=args.image_size, batch_size=args.batch_size, suite=args.suite,
                      workers=args.workers, env_options=env_options, first_episode=args.first_episode)
    for name, t in report["tasks"].items():
        print(f"{name:>8}: {t['success_rate']:6.1%}  (95% CI {t['ci95'][0]:.1%}-{t['ci95'][1]:.1%}, n={t['n']})")
    o, m = report["overall"], report["manifest"]
    print(f" overall: {o['success_rate']:6.1%}  (95% CI {o['ci95'][0]:.1%}-{o['ci95'][1]:.1%}, n={o['n']})")
    print(f"control {m['control_hz_achieved']} Hz achieved, env step {m['env_step_ms']} ms; "
          f"wrote {os.path.join(os.path.abspath(args.out), 'report.json')}")
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a DiT4DiT checkpoint (or the scripted experts) on the toy suite.")
    p.add_argument("--ckpt", default=None, help="checkpoint written by train_toy.py")
    p.add_argument("--expert", action="store_true", help="evaluate the scripted experts (the ceiling) instead")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="tasks (default: all of the suite's; toy: push reach; Meta-World: reach-v3, ...)")
    p.add_argument("--episodes", "--episodes-per-task", type=int, default=50,
                   help="episodes per task (evaluation seeds 1000000...; LIBERO: init states 0, 1, ...)")
    p.add_argument("--policy", choices=("expert", "zero"), default=None,
                   help="instead of --ckpt: the scripted experts, or zero actions (a smoke test of the loop)")
    p.add_argument("--workers", type=int, default=1, help="processes the episode batches are spread over")
    p.add_argument("--libero-suite", default=None, metavar="NAME",
                   help="--suite libero: its 10 tasks (libero_spatial (default), libero_object, libero_goal, "
                        "libero_10; libero_90)")
    p.add_argument("--libero-render", choices=("dataset", "fast", "none"), default="dataset",
                   help="--suite libero: the datasets' rendering (default), a faster one with other pixels "
                        "(smoke runs only), or none (the scripted experts' success, measured without frames)")
    p.add_argument("--out", default="out", help="output directory for report.json and gifs/")
    p.add_argument("--first-episode", type=int, default=0, metavar="N",
                   help="start at the N-th evaluation seed of each task (default 0); e.g. seeds never looked at "
                        "while tuning")
    p.add_argument("--gifs", type=int, default=2, help="rollout GIFs per task (the first episodes)")
    p.add_argument("--image-size", type=int, default=None, help="frame size (default: the model's, 64 for experts)")
    p.add_argument("--execute-steps", type=int, default=None, help="actions executed per chunk (default: K/2)")
    p.add_argument("--action-noise-scale", type=float, default=None,
                   help="std of the action sampler's starting noise (default: the checkpoint's; 1 is the paper's)")
    p.add_argument("--batch-size", type=int, default=10, help="episodes simulated in lockstep per model call")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--bench", action="store_true", help="only time one control step of each task and exit")
    p.add_argument("--suite", default="toy", choices=suites.SUITES,
                   help="the toy suite (default), Meta-World (pip install metaworld; give --tasks) or LIBERO "
                        "(see suites/libero.py)")
    return p.parse_args(argv)


def cli(argv=None):
    """The command line: bad flags, a missing, damaged or mismatched checkpoint and an unknown
    task exit with one line naming what is wrong (no traceback)."""
    try:
        return main(parse_args(argv))
    except (ValueError, FileNotFoundError, IsADirectoryError, ModuleNotFoundError) as error:
        sys.exit(f"eval_sim.py: error: {error}")


if __name__ == "__main__":
    cli()
