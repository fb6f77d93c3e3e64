"""The toy suite: a MuJoCo tabletop that a laptop simulates and renders fast, yet needs vision,
language and contact, with the gymnasium API and scripted experts.

A square table seen from straight above by a fixed orthographic camera; a black end-effector
disc moves in the table plane on two slide joints driven by velocity actuators. The action is
the end-effector velocity command in [-1, 1]^2 (times V_MAX m/s); the control rate is 10 Hz (10
physics steps of 10 ms per control step, one rendered frame per control step).
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
"""
import zlib
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

import suites  # before mujoco: sets MUJOCO_GL and the import order (see suites/__init__.py)
import mujoco
from gymnasium import spaces

NAME = "toy"
INSTALL_HINT = None  # mujoco and gymnasium are dependencies of dit4dit itself

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
LINE_UP_BEHIND = 0.06    # m, push expert: it lines up this far behind the contact point, so a learner
                         # that turns onto the line early (chunks open-loop, positions seen at ~1 px/cm)
                         # is still behind the puck when it does
GO_AROUND_CLEARANCE = 0.05  # m, push expert: beside or in front of the puck it goes around this far from it
PUSH_AHEAD = 0.10        # m, push expert: while pushing it aims this far through the puck's centre
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


def get_task(task):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
    return TASKS[task]


def demo_seeds(task, n):
    """The n seeds used to collect training demos of `task` (the same numbers for every task)."""
    return suites.seeds_for(get_task, task, n, evaluation=False)


def eval_seeds(task, n):
    """The n fixed evaluation seeds of `task`, disjoint from every demo seed."""
    return suites.seeds_for(get_task, task, n, evaluation=True)


def require():
    """Nothing to check: the toy suite needs only dit4dit's own dependencies."""


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
