"""Meta-World as a suite (the interface of suites/__init__.py): the v3 tasks of
Meta-World (Yu et al. 2019, Farama release 3.1.1) as gymnasium environments with the toy suite's
observation {"image", "state"}, an instruction sentence per task, the scripted experts that
Meta-World ships (metaworld.policies), and the same seeds, episode files and report.

    python eval_sim.py --suite metaworld --expert --tasks reach-v3 push-v3 pick-place-v3 --episodes 20
    python eval_sim.py --suite metaworld --bench --tasks reach-v3 push-v3
    python train_toy.py --suite metaworld --tasks drawer-open-v3 button-press-topdown-v3 --demos-per-task 10

Meta-World is an optional dependency, imported only when an environment is made:
`pip install metaworld` (3.1.1, which pins mujoco==3.3.0). Without it, make_env raises a
ModuleNotFoundError that names the install command.

One environment (MetaWorldEnv):
  observation  {"image": uint8 (H, W, 3) from the fixed camera CAMERA,
                "state": float32 (4,) the robot's own: hand position x, y, z (m) and the gripper
                opening in [0, 1]}; object and goal positions are only in the image (and in the
                privileged raw observation the scripted expert reads);
  action       float32 (4,) in [-1, 1]: hand displacement (x, y, z; 1 = 1 cm per control step)
               and gripper effort (Meta-World's own action);
  control      SUBSTEPS physics steps of PHYSICS_DT per control step (80 Hz), one rendered frame
               per control step;
  episode      ends at the first step Meta-World reports success (info["success"], its own test
               on the physical state), or is truncated after MAX_STEPS control steps (failure).
Seeds: a seed draws the task's random vector (object and goal positions) from the env's own
generator, so a seed gives the same scene in every process; demos and evaluation use the
disjoint suites.DEMO_SEEDS and suites.EVAL_SEEDS.

Rendering goes through a mujoco.Renderer on the env's model and data, with shadows, reflections
and multisampling off: about 9 ms a frame on a CPU (Mesa llvmpipe) instead of about 110 ms with
the defaults through gymnasium's render path.
"""
import difflib
import warnings
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium import spaces

import suites  # before mujoco: sets MUJOCO_GL and the import order (see suites/__init__.py)
import mujoco

NAME = "metaworld"
INSTALL_HINT = "pip install metaworld  (Meta-World 3.1.1; it pins mujoco==3.3.0)"
CAMERA = "corner2"       # the fixed corner camera that sees the table and the arm (DP3's choice)
MAX_STEPS = 200          # control steps before truncation; the experts succeed in 31-145 (50 tasks x 2 seeds)
PHYSICS_DT = 0.0025      # s, the Sawyer models' timestep
SUBSTEPS = 5             # Meta-World's frame_skip: physics steps per control step
CONTROL_DT = PHYSICS_DT * SUBSTEPS
STATE_DIM = 4            # P: hand x, y, z and gripper opening
ACTION_DIM = 4           # A: hand displacement x, y, z and gripper effort

# One instruction sentence per task (the task as Meta-World's paper describes it).
INSTRUCTIONS = {
    "assembly-v3": "put the nut onto the peg",
    "basketball-v3": "put the ball into the basket",
    "bin-picking-v3": "move the block from one bin into the other",
    "box-close-v3": "put the lid on the box",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button behind the wall from the top",
    "button-press-v3": "press the button",
    "button-press-wall-v3": "press the button behind the wall",
    "coffee-button-v3": "press the button of the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "take the nut off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door by turning the lock",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door by turning the lock",
    "drawer-close-v3": "close the drawer",
    "drawer-open-v3": "open the drawer",
    "faucet-close-v3": "turn the faucet handle to close it",
    "faucet-open-v3": "turn the faucet handle to open it",
    "hammer-v3": "hammer the nail into the wall",
    "hand-insert-v3": "put the gripper into the hole",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg from the side",
    "pick-out-of-hole-v3": "pick the peg out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "plate-slide-back-side-v3": "slide the plate out of the cabinet from the side",
    "plate-slide-back-v3": "slide the plate out of the cabinet",
    "plate-slide-side-v3": "slide the plate into the cabinet from the side",
    "plate-slide-v3": "slide the plate into the cabinet",
    "push-back-v3": "push the puck back to the goal",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "reach-v3": "move the gripper to the goal",
    "reach-wall-v3": "move the gripper to the goal behind the wall",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "soccer-v3": "kick the ball into the goal",
    "stick-pull-v3": "grasp the stick and pull the box with it",
    "stick-push-v3": "grasp the stick and push the box with it",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-close-v3": "close the window",
    "window-open-v3": "open the window",
}


@dataclass(frozen=True)
class MetaWorldTask:
    name: str
    instruction: str
    max_steps: int       # control steps before the episode is truncated (failure)


TASKS = {name: MetaWorldTask(name, sentence, MAX_STEPS) for name, sentence in INSTRUCTIONS.items()}


def get_task(task):
    if task not in TASKS:
        close = difflib.get_close_matches(str(task), TASKS, n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown Meta-World task {task!r}{hint} (the {len(TASKS)} v3 tasks: {sorted(TASKS)})")
    return TASKS[task]


def demo_seeds(task, n):
    """The n seeds used to collect training demos of `task` (suites.DEMO_SEEDS)."""
    return suites.seeds_for(get_task, task, n, evaluation=False)


def eval_seeds(task, n):
    """The n fixed evaluation seeds of `task`, disjoint from every demo seed (suites.EVAL_SEEDS)."""
    return suites.seeds_for(get_task, task, n, evaluation=True)


def require():
    """The metaworld package, or a ModuleNotFoundError naming the install command."""
    try:
        import metaworld
        import metaworld.policies  # noqa: F401  the scripted experts
    except ImportError as err:
        raise ModuleNotFoundError(f"Meta-World is not installed ({err}); install it with: {INSTALL_HINT}") from None
    return metaworld


def _reset_mocap_welds(self):
    """Meta-World's reset_mocap_welds, written for any mujoco: it assigns an 11-number weld row to
    eq_data, which mujoco 4.0 widened to 12 (construction then fails with 'could not broadcast
    input array from shape (11,) into shape (12,)'). The first 11 entries get Meta-World's values
    and any later ones keep the model's own; on mujoco 3.3 (the version Meta-World pins) this is
    what Meta-World's code does."""
    weld = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 5.0]
    if self.model.nmocap > 0 and self.model.eq_data is not None:
        for i in range(self.model.eq_data.shape[0]):
            if self.model.eq_type[i] == mujoco.mjtEq.mjEQ_WELD:
                self.model.eq_data[i, : len(weld)] = weld


_ENV_CLASSES = {}


def _env_class(task):
    """Meta-World's class for `task`, subclassed once with the reset_mocap_welds above."""
    if task not in _ENV_CLASSES:
        base = require().env_dict.ALL_V3_ENVIRONMENTS[task]
        _ENV_CLASSES[task] = type(base.__name__, (base,), {"reset_mocap_welds": _reset_mocap_welds})
    return _ENV_CLASSES[task]


class MetaWorldEnv(gym.Env):
    """One Meta-World v3 task with the toy suite's interface: obs = {"image": uint8 (H, W, 3),
    "state": float32 (4,)}, action float32 (4,) in [-1, 1], reward 1 on success; the episode
    terminates at the first success and is truncated at task.max_steps. `self.instruction` is the
    task's sentence; `raw_observation` Meta-World's own 39-number observation (object and goal
    positions: for the scripted expert only, never in obs)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": int(round(1 / CONTROL_DT))}

    def __init__(self, task="reach-v3", image_size=64, seed=None):
        self.task = get_task(task)
        if not isinstance(image_size, (int, np.integer)) or not 16 <= image_size <= 1024:
            raise ValueError(f"image_size must be an int in [16, 1024], got {image_size!r}")
        self.image_size = int(image_size)
        self.render_mode = "rgb_array"
        env = _env_class(task)()
        # Goal observable and a fresh random vector at every reset, drawn from env.np_random (what
        # Meta-World's goal-observable classes do, minus their reseeding of numpy's global generator).
        env._partially_observable = False
        del env.sawyer_observation_space  # a cached_property computed for the hidden goal
        env._set_task_called = True
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env.max_path_length = self.task.max_steps + 1  # our truncation comes first
        self.mw = env
        self.model, self.data = env.model, env.data
        if (self.model.opt.timestep, env.frame_skip) != (PHYSICS_DT, SUBSTEPS):
            raise RuntimeError(f"{task}: timestep {self.model.opt.timestep} x {env.frame_skip} differs from "
                               f"PHYSICS_DT={PHYSICS_DT} x SUBSTEPS={SUBSTEPS}")
        # Fast software rendering: no multisampling, no shadows, no reflections.
        self.model.vis.quality.offsamples = 0
        self.model.vis.global_.offwidth = max(self.model.vis.global_.offwidth, self.image_size)
        self.model.vis.global_.offheight = max(self.model.vis.global_.offheight, self.image_size)
        self.renderer = mujoco.Renderer(self.model, self.image_size, self.image_size)
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self.observation_space = spaces.Dict({
            "image": spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8),
            "state": spaces.Box(np.r_[env._HAND_SPACE.low, 0.0].astype(np.float32),
                                np.r_[env._HAND_SPACE.high, 1.0].astype(np.float32)),
        })
        self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        self._first_seed = seed
        self.instruction = self.task.instruction
        self.steps = 0
        self.episode_seed = None
        self.raw_observation = None
        self._frame = None

    def reset(self, *, seed=None, options=None):
        if seed is None and self._first_seed is not None:
            seed, self._first_seed = self._first_seed, None
        super().reset(seed=seed)
        if options and options.get("target") is not None:
            raise ValueError(f"options['target']: Meta-World task {self.task.name} has no pads to choose "
                             f"from, got {options['target']!r}")
        if seed is not None:
            self.mw.seed(int(seed))  # the generator the task's random vector is drawn from
        self.raw_observation, _ = self.mw.reset()
        self.steps = 0
        self.episode_seed = seed
        return self._observation(), {"success": False, "instruction": self.instruction}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be {ACTION_DIM} finite numbers, got {action!r}")
        self.raw_observation, _, _, _, mw_info = self.mw.step(np.clip(action, -1.0, 1.0).astype(np.float32))
        self.steps += 1
        success = bool(mw_info["success"])
        truncated = not success and self.steps >= self.task.max_steps
        info = {"success": success, "instruction": self.instruction}
        return self._observation(), float(success), success, truncated, info

    def render(self):
        return self._frame

    def close(self):
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None
            self.mw.close()

    def _observation(self):
        self.renderer.update_scene(self.data, camera=CAMERA)
        # corner2's frames come out upside down; turned half a turn, the floor is at the bottom
        self._frame = np.ascontiguousarray(self.renderer.render()[::-1, ::-1])
        state = self.raw_observation[:STATE_DIM].astype(np.float32)  # hand x, y, z, gripper opening
        return {"image": self._frame, "state": state}


def make_env(task, image_size=64, seed=None):
    """A Meta-World environment (gymnasium API); `seed` is used by the first reset() without one."""
    return MetaWorldEnv(task, image_size=image_size, seed=seed)


def scripted_expert(env):
    """Meta-World's scripted policy for the env's task (obs -> action), reading the privileged raw
    observation; its actions clipped to [-1, 1], as the env clips them."""
    u = env.unwrapped
    with warnings.catch_warnings():  # "Constant(s) may be too high": the env clips, and so do we
        warnings.simplefilter("ignore", UserWarning)
        policy = require().policies.ENV_POLICY_MAP[u.task.name]()

    def act(obs=None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            action = policy.get_action(u.raw_observation)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    return act
