"""The simulation half of dit4dit: a MuJoCo toy tabletop with the gymnasium API, scripted
experts, the episode format on disk, closed-loop rollouts of a DiT4DiT policy and the
evaluation protocol (DESIGN.md §5).

    python eval_sim.py --expert                          # the scripted experts: the ceiling
    python eval_sim.py --ckpt runs/x/checkpoint.pt       # a trained policy, 50 episodes per task
    python eval_sim.py --ckpt C --tasks push --episodes 20 --gifs 3 --out runs/x/eval
    python eval_sim.py --bench                           # time one control step (physics + render)
    python eval_sim.py --suite metaworld --expert --tasks reach-v3 push-v3   # Meta-World: metaworld_suite.py

The toy suite. A square table seen from straight above by a fixed orthographic camera; a black
end-effector disc moves in the table plane on two slide joints driven by velocity actuators.
The action is the end-effector velocity command in [-1, 1]^2 (times V_MAX m/s); the control
rate is 10 Hz (10 physics steps of 10 ms per control step, one rendered frame per control step).
  reach  "move to the {color} pad"            3 pads (red, green, blue); success: the
                                               end-effector centre is on the named pad.
  push   "push the puck onto the {color} pad" a yellow puck that slides with friction and 2 pads
                                               of 2 of the 3 colours; success: the puck centre
                                               is on the named pad. A contact task. The
                                               end-effector starts behind the puck as seen from
                                               either pad: the push lines up, then pushes.
The episode ends when the moved object's centre comes onto a pad: the named pad is a success,
another pad a failure (visiting every pad is no way to succeed); or after max_steps (failure).
Pads, puck and start position are drawn per episode from the seed and are visible only in the
image: the state vector is the end-effector's own position (x, y), never an object or a goal.
The layout is drawn before the named pad is chosen (uniformly), so a policy that ignores the
text succeeds at chance rate (1/3 on reach, 1/2 on push).

Evaluation (DESIGN §5.2): fixed seeds EVAL_SEEDS disjoint from the demo seeds DEMO_SEEDS,
success per task and overall with 95 % Wilson intervals, a JSON report with a manifest, rollout
GIFs (imagined future frames beside the real ones for DiT4DiT), and an environment error in
one episode recorded as a failed episode while the evaluation goes on.
"""
import os

# Offscreen GL without a display. MuJoCo reads this when it is first imported: import eval_sim
# before mujoco (or set MUJOCO_GL yourself) for the default to apply.
os.environ.setdefault("MUJOCO_GL", "egl")

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import subprocess
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import torch._dynamo  # noqa: F401  before mujoco: Triton's LLVM must load before the EGL renderer loads
                      # Mesa's LLVM, or a later torch.compile / optimizer import segfaults the process
import mujoco
from gymnasium import spaces
from PIL import Image, ImageDraw
from tqdm import tqdm

import dit4dit

# ----------------------------------------------------------------------------------------------
# The toy suite: geometry, physics and tasks

TABLE_HALF = 0.34        # m, half side of the square table; the camera sees exactly the table
EE_RANGE = 0.30          # m, the end-effector's slide joints are limited to [-EE_RANGE, EE_RANGE]
EE_RADIUS = 0.035        # m, end-effector disc (7 px wide at 64x64)
PUCK_RADIUS = 0.04       # m, puck disc (8 px wide at 64x64)
PAD_HALF = 0.06          # m, half side of a square goal pad (11 px wide at 64x64)
PATH_CLEARANCE = 0.11    # m, straight paths to a pad pass this far from the other pads' centres
PUSH_START_BEHIND = 0.05  # m, push: the end-effector starts at least this far behind the puck
                         # along the line from the puck to each pad (see ToyTableEnv.reset)
ALIGN_WIDTH = 0.05       # m, push expert: lateral offset from the push line over which it blends
                         # from lining up behind the puck to pushing through it (see scripted_expert)
LINE_UP_BEHIND = 0.06    # m, push expert: it lines up this far behind the contact point, so a learner that
                         # turns onto the line early (chunks open-loop, positions seen at ~1 px/cm) is still
                         # behind the puck when it does (0.015 before DEMO_FORMAT 4)
GO_AROUND_CLEARANCE = 0.05  # m, push expert: beside or in front of the puck it goes around this far from it
PUSH_AHEAD = 0.10        # m, push expert: while pushing it aims this far through the puck's centre
RECOVERY_RING = (0.09, 0.18)  # m, recovery demos' end-effector start: this far from the puck's centre
V_MAX = 0.5              # m/s, end-effector speed for an action of norm 1
PHYSICS_DT = 0.01        # s
SUBSTEPS = 10            # physics steps per control step: 10 Hz control
CONTROL_DT = PHYSICS_DT * SUBSTEPS
COLORS = {"red": (0.90, 0.10, 0.10), "green": (0.10, 0.75, 0.15), "blue": (0.10, 0.25, 0.95)}
STATE_DIM = 2            # P: end-effector x, y. No velocity: after the first step a policy could
                         # keep going the way it already moves (a ~= 2v in the demos) and never
                         # learn to read the instruction and the image, which only the first step needed
ACTION_DIM = 2           # A: end-effector velocity command, in units of V_MAX
CAMERA = "top"
# MJCF spells an orthographic camera orthographic="true" in MuJoCo 3.3 (the version Meta-World
# pins) and projection="orthographic" in 4.0; each rejects the other's
ORTHOGRAPHIC = 'projection="orthographic"' if hasattr(mujoco.MjModel, "cam_projection") else 'orthographic="true"'


@dataclass(frozen=True)
class ToyTask:
    name: str
    instruction: str     # template with {color}
    num_pads: int
    has_puck: bool
    max_steps: int       # control steps before the episode is truncated (failure)


TASKS = {
    "reach": ToyTask("reach", "move to the {color} pad", num_pads=3, has_puck=False, max_steps=25),
    "push": ToyTask("push", "push the puck onto the {color} pad", num_pads=2, has_puck=True, max_steps=50),
}

# Seeds: demos come from the first range, evaluation from the second; the two never meet.
DEMO_SEEDS = range(0, 1_000_000)
EVAL_SEEDS = range(1_000_000, 2_000_000)


def get_task(task):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
    return TASKS[task]


def demo_seeds(task, n):
    """The n seeds used to collect training demos of `task` (the same numbers for every task)."""
    get_task(task)
    return list(DEMO_SEEDS[:n])


def eval_seeds(task, n):
    """The n fixed evaluation seeds of `task`, disjoint from every demo seed."""
    get_task(task)
    if n > len(EVAL_SEEDS):
        raise ValueError(f"episodes={n}: at most {len(EVAL_SEEDS)} evaluation seeds")
    return list(EVAL_SEEDS[:n])


def build_mjcf(task, image_size):
    """MJCF of the table for one task: end-effector, optional puck, `num_pads` pads (mocap bodies
    placed per episode). Only the end-effector and the puck collide; the puck has no contact with
    the table: it slides on two slide joints whose `frictionloss` is its dry friction."""
    pads = "\n".join(
        f'    <body name="pad{i}" mocap="true" pos="0 0 -1">\n'
        f'      <geom name="pad{i}" type="box" size="{PAD_HALF} {PAD_HALF} 0.002" rgba="1 1 1 1"/>\n'
        f"    </body>" for i in range(task.num_pads))
    puck = f"""
    <body name="puck" pos="0 0 0.02">
      <joint name="puck_x" type="slide" axis="1 0 0" range="-{EE_RANGE} {EE_RANGE}" damping="1" frictionloss="0.3"/>
      <joint name="puck_y" type="slide" axis="0 1 0" range="-{EE_RANGE} {EE_RANGE}" damping="1" frictionloss="0.3"/>
      <inertial pos="0 0 0" mass="0.1" diaginertia="1e-4 1e-4 1e-4"/>
      <geom name="puck" type="cylinder" size="{PUCK_RADIUS} 0.01" rgba="0.95 0.85 0.10 1"/>
      <geom name="puck_collision" type="sphere" size="{PUCK_RADIUS}" contype="1" conaffinity="1" group="3"/>
    </body>""" if task.has_puck else ""
    return f"""
<mujoco model="dit4dit_toy_{task.name}">
  <option timestep="{PHYSICS_DT}" integrator="implicitfast"/>
  <visual>
    <global offwidth="{image_size}" offheight="{image_size}"/>
    <headlight ambient="0.7 0.7 0.7" diffuse="0.3 0.3 0.3" specular="0 0 0"/>
    <quality shadowsize="0"/>
  </visual>
  <default>
    <geom contype="0" conaffinity="0" friction="0.5"/>
  </default>
  <worldbody>
    <camera name="{CAMERA}" pos="0 0 1" xyaxes="1 0 0 0 1 0" {ORTHOGRAPHIC} fovy="{2 * TABLE_HALF}"/>
    <geom name="table" type="box" pos="0 0 -0.01" size="{TABLE_HALF + 0.1} {TABLE_HALF + 0.1} 0.01" rgba="0.55 0.55 0.55 1"/>
{pads}{puck}
    <body name="ee" pos="0 0 0.02">
      <joint name="ee_x" type="slide" axis="1 0 0" range="-{EE_RANGE} {EE_RANGE}" damping="0.1"/>
      <joint name="ee_y" type="slide" axis="0 1 0" range="-{EE_RANGE} {EE_RANGE}" damping="0.1"/>
      <inertial pos="0 0 0" mass="0.5" diaginertia="1e-3 1e-3 1e-3"/>
      <geom name="ee" type="cylinder" size="{EE_RADIUS} 0.015" rgba="0.05 0.05 0.05 1"/>
      <geom name="ee_collision" type="sphere" size="{EE_RADIUS}" contype="1" conaffinity="1" group="3"/>
    </body>
  </worldbody>
  <actuator>
    <velocity name="vx" joint="ee_x" kv="40" ctrlrange="-{V_MAX} {V_MAX}" forcerange="-30 30"/>
    <velocity name="vy" joint="ee_y" kv="40" ctrlrange="-{V_MAX} {V_MAX}" forcerange="-30 30"/>
  </actuator>
</mujoco>
"""


def _sample_points(rng, n, low, high, min_dist, others=(), min_dist_others=0.0, tries=1000):
    """n points uniform in [low, high]^2, pairwise >= min_dist apart and >= min_dist_others from `others`."""
    for _ in range(tries):
        pts = rng.uniform(low, high, size=(n, 2))
        ok = all(np.linalg.norm(pts[i] - pts[j]) >= min_dist for i in range(n) for j in range(i))
        ok = ok and all(np.linalg.norm(p - o) >= min_dist_others for p in pts for o in others)
        if ok:
            return pts
    raise RuntimeError("could not sample a layout; the constraints are too tight")


class ToyTableEnv(gym.Env):
    """One task of the toy suite. obs = {"image": uint8 (H, W, 3), "state": float32 (4,)},
    action float32 (2,) in [-1, 1]; reward 1 on success. The episode terminates when the moved
    object comes onto a pad (info["success"]: the named one; info["wrong_pad"]: another one) and
    is truncated at task.max_steps. One frame is rendered per control step (MuJoCo's offscreen
    renderer), never per physics step."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": int(round(1 / CONTROL_DT))}

    def __init__(self, task="reach", image_size=64, seed=None):
        self.task = get_task(task)
        if not isinstance(image_size, (int, np.integer)) or not 16 <= image_size <= 1024:
            raise ValueError(f"image_size must be an int in [16, 1024], got {image_size!r}")
        self.image_size = int(image_size)
        self.render_mode = "rgb_array"
        self.model = mujoco.MjModel.from_xml_string(build_mjcf(self.task, self.image_size))
        self.data = mujoco.MjData(self.model)
        self.renderer = mujoco.Renderer(self.model, self.image_size, self.image_size)
        self.observation_space = spaces.Dict({
            "image": spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8),
            # x, y within the joint limits (+ the soft limits' give)
            "state": spaces.Box(np.full(STATE_DIM, -EE_RANGE - 0.02, np.float32),
                                np.full(STATE_DIM, EE_RANGE + 0.02, np.float32)),
        })
        self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        joint = lambda name: self.model.jnt_qposadr[self.model.joint(name).id]
        self._ee_q = [joint("ee_x"), joint("ee_y")]
        self._puck_q = [joint("puck_x"), joint("puck_y")] if self.task.has_puck else None
        self._pad_geoms = [self.model.geom(f"pad{i}").id for i in range(self.task.num_pads)]
        self._first_seed = seed
        self.pad_colors, self.target = [], 0
        self.instruction = ""
        self.steps = 0
        self.episode_seed = None  # seed of the current episode (None: unseeded or placed by hand)
        self._frame = None

    # --- privileged physical state (for experts, success tests and tests; never in obs)
    def ee_pos(self):
        return self.data.qpos[self._ee_q].copy()

    def puck_pos(self):
        return self.data.qpos[self._puck_q].copy() if self.task.has_puck else None

    def pad_pos(self):
        return self.data.mocap_pos[:, :2].copy()  # (num_pads, 2), mocap order = pad order

    def target_pos(self):
        return self.pad_pos()[self.target]

    def set_layout(self, ee, pads, colors, target, puck=None):
        """Place everything by hand (positions in m) and re-render; the episode clock restarts."""
        mujoco.mj_resetData(self.model, self.data)
        pads = np.asarray(pads, dtype=np.float64).reshape(self.task.num_pads, 2)
        self.data.mocap_pos[:] = np.c_[pads, np.full(len(pads), 0.001)]
        for geom, color in zip(self._pad_geoms, colors):
            self.model.geom_rgba[geom, :3] = COLORS[color]
        self.pad_colors, self.target = list(colors), int(target)
        self.data.qpos[self._ee_q] = ee
        if self.task.has_puck:
            self.data.qpos[self._puck_q] = puck
        mujoco.mj_forward(self.model, self.data)
        self.instruction = self.task.instruction.format(color=self.pad_colors[self.target])
        self.steps = 0
        self.episode_seed = None
        return self._observation()

    def pad_under(self):
        """Index of the pad under the moved object's centre (end-effector for reach, puck for
        push), or None."""
        return pad_under(self.ee_pos() if self.task.name == "reach" else self.puck_pos(), self.pad_pos())

    def is_success(self):
        return self.pad_under() == self.target

    # --- gymnasium API
    def reset(self, *, seed=None, options=None):
        if seed is None and self._first_seed is not None:
            seed, self._first_seed = self._first_seed, None
        super().reset(seed=seed)
        if seed is not None:  # the task name joins the seed: reach and push layouts of seed s are unrelated
            self.np_random = np.random.default_rng([int(seed), zlib.crc32(self.task.name.encode())])
        rng = self.np_random
        t = self.task
        colors = list(rng.permutation(sorted(COLORS)))[: t.num_pads]
        # The straight line from the moved object (end-effector for reach, puck for push) to EVERY
        # pad keeps PATH_CLEARANCE from the other pads: going straight to the named pad never
        # crosses a wrong one, and the rule is the same for all pads, so the layout holds no cue
        # about which pad will be named.
        while True:
            if t.has_puck:
                # pads apart, the puck off both pads and at a similar distance from each (so "the
                # nearest pad" is no cue), the end-effector clear of the puck
                pads = _sample_points(rng, 2, -0.2, 0.2, min_dist=0.22)
                puck = rng.uniform(-0.15, 0.15, size=2)
                d = np.linalg.norm(pads - puck, axis=1)
                if not (d.min() >= 0.13 and d.max() <= 0.30):
                    continue
                ee = _sample_points(rng, 1, -0.25, 0.25, 0.0, others=[puck], min_dist_others=0.13)[0]
                mover = puck
                # the end-effector starts behind the puck as seen from EITHER pad (PUSH_START_BEHIND),
                # so whichever pad is named the push begins by lining up, never by going around
                if not all((ee - puck) @ (p - puck) / np.linalg.norm(p - puck) <= -PUSH_START_BEHIND
                           for p in pads):
                    continue
            else:
                pads = _sample_points(rng, 3, -0.22, 0.22, min_dist=0.18)
                puck = None
                ee = _sample_points(rng, 1, -0.25, 0.25, 0.0, others=pads, min_dist_others=0.12)[0]
                mover = ee
            if all(_segment_distance(pads[j], mover, pads[i]) >= PATH_CLEARANCE
                   for i in range(len(pads)) for j in range(len(pads)) if i != j):
                break
        target = int(rng.integers(t.num_pads))  # drawn after the layout: the layout has no cue
        if options and options.get("target") is not None:  # a demo of this layout toward another pad
            target = options["target"]
            if not isinstance(target, (int, np.integer)) or not 0 <= target < t.num_pads:
                raise ValueError(f"options['target']: expected a pad index in [0, {t.num_pads}), got {target!r}")
        obs = self.set_layout(ee, pads, colors, int(target), puck)
        self.episode_seed = seed
        return obs, {"success": False, "instruction": self.instruction}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be {ACTION_DIM} finite numbers, got {action!r}")
        self.data.ctrl[:] = np.clip(action, -1.0, 1.0) * V_MAX
        for _ in range(SUBSTEPS):
            mujoco.mj_step(self.model, self.data)
        self.steps += 1
        on = self.pad_under()
        success = on == self.target
        terminated = on is not None  # on a pad: the named one is a success, another one a failure
        truncated = not terminated and self.steps >= self.task.max_steps
        info = {"success": success, "wrong_pad": terminated and not success, "instruction": self.instruction}
        return self._observation(), float(success), terminated, truncated, info

    def render(self):
        return self._frame

    def close(self):
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None

    def _observation(self):
        self.renderer.update_scene(self.data, camera=CAMERA)
        self._frame = self.renderer.render().copy()
        state = self.data.qpos[self._ee_q].astype(np.float32)  # (x, y): no velocity, see STATE_DIM
        return {"image": self._frame, "state": state}


def pad_under(point, pads):
    """Index of the first pad whose square (PAD_HALF around its centre, along both table axes)
    holds `point`, or None. The episode ends when the moved object's centre comes onto a pad:
    success on the named pad, failure on another (so visiting every pad is no way to succeed)."""
    inside = np.all(np.abs(np.asarray(pads) - np.asarray(point)) <= PAD_HALF, axis=1)
    return int(np.argmax(inside)) if inside.any() else None


def _segment_distance(p, a, b):
    """Distance from point p to the segment a-b."""
    ab = b - a
    t = np.clip((p - a) @ ab / max(ab @ ab, 1e-12), 0.0, 1.0)
    return float(np.linalg.norm(p - (a + t * ab)))


def make_env(task, image_size=64, seed=None):
    """A toy-suite environment (gymnasium API); `seed` is used by the first reset() without one."""
    return ToyTableEnv(task, image_size=image_size, seed=seed)


# ----------------------------------------------------------------------------------------------
# Suites: this module is the toy suite; metaworld_suite.py is Meta-World (an optional dependency).
# A suite is a module with TASKS (name -> task with .instruction, .max_steps), get_task,
# demo_seeds, eval_seeds, make_env, scripted_expert, CONTROL_DT, PHYSICS_DT, SUBSTEPS, ACTION_DIM.

SUITES = ("toy", "metaworld")


def get_suite(name):
    """The module of suite `name`. For "metaworld", Meta-World must be installed: otherwise a
    ModuleNotFoundError naming the install command."""
    if name == "toy":
        return sys.modules[__name__]
    if name == "metaworld":
        import metaworld_suite

        metaworld_suite.require_metaworld()
        return metaworld_suite
    raise ValueError(f"unknown suite {name!r}; known suites: {list(SUITES)}")


# ----------------------------------------------------------------------------------------------
# Scripted experts: read the privileged physical state, act smoothly (proportional control,
# saturated at V_MAX) so that action chunks are predictable.

def _toward(ee, point, gain=0.5, speed=1.0):
    """Velocity command (action units) covering `gain` of the way to `point` in one control step,
    its norm capped at `speed`."""
    v = gain * (np.asarray(point) - ee) / (V_MAX * CONTROL_DT)
    n = np.linalg.norm(v)
    return v * (speed / n) if n > speed else v


def scripted_expert(env):
    """Policy for `env` (obs -> action) that reads the physical state of the unwrapped env."""
    u = env.unwrapped
    if u.task.name == "reach":
        return lambda obs=None: _toward(u.ee_pos(), u.target_pos()).astype(np.float32)

    contact = EE_RADIUS + PUCK_RADIUS

    def push(obs=None):
        # Stateless, re-decided every step from the current positions. Beside or in front of the
        # puck: go around it on the side the end-effector is on. Behind it: aim at a blend of the
        # point behind the puck on the line to the goal and a point through the puck on that line,
        # weighted by how well the end-effector is lined up (w = 1 on the line, 0 at ALIGN_WIDTH
        # to the side). No hard switch: a small error in the positions changes the action
        # little, so a policy that sees the positions less exactly than the expert still pushes.
        ee, puck, goal = u.ee_pos(), u.puck_pos(), u.target_pos()
        d = goal - puck
        d /= max(np.linalg.norm(d), 1e-9)     # push direction
        n = np.array([-d[1], d[0]])           # its normal
        rel = ee - puck
        along, side = rel @ d, rel @ n
        if along > -0.5 * contact:
            s = 1.0 if side >= 0 else -1.0
            waypoint = puck + n * s * (contact + GO_AROUND_CLEARANCE) - d * contact
            return _toward(ee, waypoint, gain=0.7).astype(np.float32)
        w = float(np.clip(1 - abs(side) / ALIGN_WIDTH, 0, 1)
                  * np.clip((-along - 0.5 * contact) / (0.3 * contact), 0, 1))
        behind = puck - d * (contact + LINE_UP_BEHIND)
        through = puck + d * PUSH_AHEAD - n * side  # steering back onto the line
        aim = (1 - w) * behind + w * through
        return _toward(ee, aim, gain=0.7 - 0.1 * w, speed=1.0 - 0.4 * w).astype(np.float32)

    return push


def recovery_start(env, rng):
    """A push end-effector start for a recovery demo: uniform on a ring RECOVERY_RING around the
    puck, at any angle (beside it, in front of it, behind it), on the table and off every pad."""
    u = env.unwrapped
    puck, pads = u.puck_pos(), u.pad_pos()
    for _ in range(1000):
        angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(*RECOVERY_RING)
        ee = puck + radius * np.array([np.cos(angle), np.sin(angle)])
        if np.all(np.abs(ee) <= EE_RANGE - EE_RADIUS) and np.all(np.abs(pads - ee).max(axis=1) > PAD_HALF + EE_RADIUS):
            return ee
    raise RuntimeError(f"no recovery start found around the puck at {puck} (seed {u.episode_seed})")


def collect_episode(task, seed, image_size=64, target=None, suite="toy", noise=0.0, recovery=False):
    """One scripted-expert episode in the on-disk format (see save_episode). `target` (a pad index)
    names another pad than the seed draws, so one layout can be demonstrated toward every pad.

    recovery (toy `push` only): the end-effector starts anywhere around the puck (recovery_start)
    instead of behind it, so the demo shows the expert going around the puck to line up: the state
    a learner that overshot the puck is in. Evaluation layouts always start behind the puck.

    noise > 0 (DART, Laskey et al. 2017): the env executes the expert's command plus Gaussian
    noise of this std per action dimension (clipped to [-1, 1]), while the episode records the
    expert's own command. The demos then visit the states a learner's small errors lead to (an
    end-effector off the push line, or past the puck) and show how the expert recovers from them.
    The noise is drawn from (seed, target): the same call gives the same episode."""
    S = get_suite(suite)
    env = S.make_env(task, image_size=image_size)
    rng = np.random.default_rng([int(seed), 0 if target is None else int(target) + 1, zlib.crc32(task.encode())])
    try:
        obs, info = env.reset(seed=seed, options={"target": target})
        if recovery:
            u = env.unwrapped
            if suite != "toy" or not u.task.has_puck:
                raise ValueError(f"recovery demos are for the toy suite's push task, not {suite}/{task}")
            obs = u.set_layout(recovery_start(env, rng), u.pad_pos(), u.pad_colors, u.target, u.puck_pos())
        expert = S.scripted_expert(env)
        frames, states, actions = [obs["image"]], [obs["state"]], []
        while True:
            action = expert(obs)
            executed = action if noise == 0 else np.clip(
                action + noise * rng.standard_normal(action.shape), -1.0, 1.0).astype(action.dtype)
            obs, _, terminated, truncated, info = env.step(executed)
            frames.append(obs["image"])
            states.append(obs["state"])
            actions.append(action)
            if terminated or truncated:
                success = info["success"]
                break
        return {"frames": np.stack(frames), "state": np.stack(states).astype(np.float32),
                "action": np.stack(actions).astype(np.float32), "instruction": env.unwrapped.instruction,
                "task": task, "seed": int(seed), "success": bool(success)}
    finally:
        env.close()


# ----------------------------------------------------------------------------------------------
# Episodes on disk: one compressed .npz per episode.
#   frames       uint8   (T+1, H, W, 3)  frames[t] is the observation before action[t];
#                                        frames[T] the one after the last action
#   state        float32 (T+1, P)        proprioceptive state at the same instants
#   action       float32 (T, A)          the expert's command at step t, in [-1, 1] (executed as is,
#                                        or with noise added: collect_episode's `noise`)
#   instruction  str, task str, seed int64, success bool  (0-d arrays)

EPISODE_KEYS = ("frames", "state", "action", "instruction", "task", "seed", "success")


def save_episode(path, episode):
    """Write `episode` (dict with EPISODE_KEYS) to `path` atomically (dit4dit.atomic_write)."""
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
    dit4dit.atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


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


# ----------------------------------------------------------------------------------------------
# Policies behind one interface, so that one rollout loop serves every environment family:
#   reset(envs, gif_rows=(), seed=0)   a new batch of episodes, one per env (rows)
#   act(rows, observations) -> (len(rows), A) float32 actions for those rows
#   imagined: dict row -> uint8 (F, H, W, 3) future frames the policy imagined at its last plan
#   describe() -> dict for the report's manifest

class ExpertPolicy:
    """The scripted experts (privileged physical state): the ceiling of the suite.
    make_expert: env -> expert (default: the toy suite's scripted_expert)."""

    def __init__(self, make_expert=None):
        self._make_expert = make_expert or scripted_expert

    def reset(self, envs, gif_rows=(), seed=0):
        self._experts = [self._make_expert(env) for env in envs]
        self.imagined = {}

    def act(self, rows, observations):
        return np.stack([self._experts[r](obs) for r, obs in zip(rows, observations)]).astype(np.float32)

    def describe(self):
        return {"policy": "scripted_expert"}


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
        video = dit4dit.frames_to_video(images[:, None])                          # (B, 3, 1, H, W)
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
            imagined = dit4dit.video_to_frames(imagined)                           # (b, 1+F, H, W, 3)
            for i, frames in zip(gif, imagined):
                self.imagined[rows[i]] = frames[1:]

    def describe(self):
        return {"policy": "dit4dit", "config": dataclasses.asdict(self.model.config),
                "execute_steps": self.execute_steps, "checkpoint": self.checkpoint}


def load_policy(path, execute_steps=None, device="cpu", action_noise_scale=None):
    """ModelPolicy from a checkpoint written by dit4dit.save_checkpoint (train_toy.py's);
    action_noise_scale replaces the checkpoint config's (the sampler's starting-noise std)."""
    ckpt = dit4dit.load_checkpoint(path)  # FileNotFoundError / ValueError naming the file
    if action_noise_scale is not None:  # checked with the rest of the config by model_from_checkpoint
        ckpt = {**ckpt, "config": {**ckpt["config"], "action_noise_scale": action_noise_scale}}
    model, state_normalizer, action_normalizer = dit4dit.model_from_checkpoint(ckpt)
    policy = ModelPolicy(model.to(device), state_normalizer, action_normalizer, execute_steps)
    policy.checkpoint = {"path": os.path.abspath(path), "sha256": file_sha256(path), "step": ckpt.get("step")}
    return policy


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
# Evaluation protocol (DESIGN §5.2)

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


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit():
    """HEAD of the repository holding this file, or None outside git / before the first commit."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_versions(suite="toy"):
    import PIL

    versions = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                "mujoco": mujoco.__version__, "gymnasium": gym.__version__, "pillow": PIL.__version__}
    if suite == "metaworld":
        from importlib.metadata import version

        versions["metaworld"] = version("metaworld")
    return versions


def _summary(successes, n):
    low, high = wilson_interval(successes, n)
    return {"success_rate": successes / n, "ci95": [low, high], "successes": successes, "n": n}


def evaluate(policy, tasks=None, episodes=50, out_dir="out", gif_episodes=2, image_size=None,
             batch_size=10, progress=True, suite="toy"):
    """Closed-loop evaluation of `policy` ("expert", an ExpertPolicy or a ModelPolicy) on
    `episodes` fixed evaluation seeds per task of `suite` ("toy" or "metaworld"). Writes
    out_dir/report.json and the GIFs of the first `gif_episodes` episodes of each task under
    out_dir/gifs/; returns the report dict."""
    started, wall0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    S = get_suite(suite)
    if policy == "expert":
        policy = ExpertPolicy(S.scripted_expert)
    tasks = list(S.TASKS) if tasks is None else list(tasks)
    for task in tasks:
        S.get_task(task)
    for name, value, low in (("episodes", episodes, 1), ("batch_size", batch_size, 1), ("gif_episodes", gif_episodes, 0)):
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
    for task in tasks:
        seeds = S.eval_seeds(task, episodes)
        seeds_used[task] = seeds
        envs = [S.make_env(task, image_size=image_size) for _ in range(min(batch_size, episodes))]
        bar = tqdm(total=episodes, desc=f"eval {task}", unit="ep", disable=not progress)
        successes = 0
        try:
            for start in range(0, episodes, batch_size):
                batch = seeds[start:start + batch_size]
                record = [r for r in range(len(batch)) if start + r < gif_episodes]
                t0 = time.perf_counter()
                results, secs, steps = run_episodes(envs[:len(batch)], batch, policy, record=record)
                rollout_seconds += time.perf_counter() - t0
                env_seconds, env_steps = env_seconds + secs, env_steps + steps
                for r, res in enumerate(results):
                    entry = {"task": task, **{k: v for k, v in res.items() if k != "frames"}}
                    if "frames" in res and res["frames"]:
                        os.makedirs(os.path.join(out_dir, "gifs"), exist_ok=True)
                        entry["gif"] = os.path.join("gifs", f"{task}_seed{res['seed']}.gif")
                        write_gif(os.path.join(out_dir, entry["gif"]), res["frames"])
                    report_episodes.append(entry)
                    successes += res["success"]
                bar.update(len(batch))
                bar.set_postfix(success=f"{successes}/{start + len(batch)}")
        finally:
            bar.close()
            for env in envs:
                env.close()
        per_task[task] = _summary(successes, episodes)

    total = sum(t["successes"] for t in per_task.values())
    report = {
        "overall": _summary(total, episodes * len(tasks)),
        "tasks": per_task,
        "episodes": report_episodes,
        "manifest": {
            "git_commit": git_commit(),
            "started": started,
            "command": sys.argv,
            "config": {"suite": suite, "tasks": tasks, "episodes_per_task": episodes, "image_size": image_size,
                       "batch_size": batch_size, "control_hz": 1 / S.CONTROL_DT, "physics_dt": S.PHYSICS_DT,
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
    dit4dit.atomic_write(os.path.join(out_dir, "report.json"), lambda f: json.dump(report, f, indent=2), mode="w")
    return report


def benchmark_control_step(task, image_size=64, steps=300, suite="toy"):
    """Wall time of one control step (SUBSTEPS physics steps + one rendered frame) under random
    actions: (median ms, mean ms). A measurement to print, never to assert."""
    S = get_suite(suite)
    env = S.make_env(task, image_size=image_size)
    rng, times = np.random.default_rng(0), []
    try:
        env.reset(seed=EVAL_SEEDS[0])
        for i in range(steps):
            action = rng.uniform(-1, 1, S.ACTION_DIM).astype(np.float32)
            t0 = time.perf_counter()
            _, _, terminated, truncated, _ = env.step(action)
            times.append(time.perf_counter() - t0)
            if terminated or truncated:
                env.reset(seed=EVAL_SEEDS[i + 1])
    finally:
        env.close()
    return 1000 * float(np.median(times)), 1000 * float(np.mean(times))


# ----------------------------------------------------------------------------------------------
# Command line

def main(args):
    S = get_suite(args.suite)
    if args.bench:
        if args.suite != "toy" and not args.tasks:
            raise ValueError(f"--bench --suite {args.suite}: name the tasks to time with --tasks")
        for task in args.tasks or TASKS:
            S.get_task(task)
            median, mean = benchmark_control_step(task, args.image_size or 64, suite=args.suite)
            print(f"{task:>8}: control step (physics x{S.SUBSTEPS} + one {args.image_size or 64}px frame) "
                  f"median {median:.2f} ms, mean {mean:.2f} ms  (MUJOCO_GL={os.environ.get('MUJOCO_GL')})")
        return None
    if args.expert == (args.ckpt is not None):
        raise ValueError("give exactly one of --ckpt PATH (a trained policy) or --expert (the scripted experts)")
    for task in args.tasks or []:  # before a checkpoint is loaded
        S.get_task(task)
    if args.expert:
        policy = ExpertPolicy(S.scripted_expert)
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
                      image_size=args.image_size, batch_size=args.batch_size, suite=args.suite)
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
                   help=f"tasks (default: all of the suite's; toy: {sorted(TASKS)}; Meta-World: reach-v3, ...)")
    p.add_argument("--episodes", type=int, default=50, help="episodes per task (evaluation seeds 1000000...)")
    p.add_argument("--out", default="out", help="output directory for report.json and gifs/")
    p.add_argument("--gifs", type=int, default=2, help="rollout GIFs per task (the first episodes)")
    p.add_argument("--image-size", type=int, default=None, help="frame size (default: the model's, 64 for experts)")
    p.add_argument("--execute-steps", type=int, default=None, help="actions executed per chunk (default: K/2)")
    p.add_argument("--action-noise-scale", type=float, default=None,
                   help="std of the action sampler's starting noise (default: the checkpoint's; 1 is the paper's)")
    p.add_argument("--batch-size", type=int, default=10, help="episodes simulated in lockstep per model call")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--bench", action="store_true", help="only time one control step of each task and exit")
    p.add_argument("--suite", default="toy", choices=SUITES,
                   help="the toy suite (default) or Meta-World (pip install metaworld; give --tasks)")
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
