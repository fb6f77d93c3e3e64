"""The LIBERO suite (suites/libero.py): the task table, init states, resets, steps, and the observation
conventions of the LeRobot LIBERO datasets. Needs LIBERO (suites.libero.INSTALL_HINT); skipped without
it unless DIT4DIT_REQUIRE_LIBERO=1 (CI sets it, so a missing install fails there). About a minute on
one CPU core: one environment is built and shared by the tests that step it."""
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

import suites
from suites import libero as L

if not L.TASKS or L._missing():
    if os.environ.get("DIT4DIT_REQUIRE_LIBERO") == "1":
        raise ModuleNotFoundError(f"DIT4DIT_REQUIRE_LIBERO=1 but LIBERO is not installed: {L.INSTALL_HINT}")
    pytest.skip(f"LIBERO is not installed ({L.INSTALL_HINT})", allow_module_level=True)

FIXTURE = Path(__file__).parent / "fixtures" / "lerobot"
if not (FIXTURE / "libero_like").is_dir():
    FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "lerobot"
FOUR = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520}
TASK = "libero_spatial/0"
pytestmark = pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")  # robosuite's


@pytest.fixture(scope="module")
def env():
    e = L.make_env(TASK, image_size=64)
    yield e
    e.close()


# ----------------------------------------------------------------------------------------------
# The task table (no simulator)

def test_four_suites_tasks_instructions_init_states_and_limits():
    L.require()   # first: it writes LIBERO's config, which LIBERO's import would otherwise ask for on stdin
    from libero.libero import benchmark  # LIBERO's own table, to compare with

    for suite, limit in FOUR.items():
        names = L.suite_tasks(suite)
        assert len(names) == 10, suite
        theirs = benchmark.get_benchmark_dict()[suite]()   # task order 0, the published one
        for i, name in enumerate(names):
            task = L.get_task(name)
            assert task.suite == suite and task.index == i and task.max_steps == limit
            assert task.name == f"{suite}/{theirs.get_task(i).name}"
            assert task.instruction and task.instruction == theirs.get_task(i).language
            states = L.init_states(name)
            assert states.shape[0] == L.N_INIT_STATES == 50 and states.dtype == np.float64
            assert np.array_equal(states, np.asarray(theirs.get_task_init_states(i)))
            assert L.get_task(f"{suite}/{i}") is task
    assert len(L.suite_tasks("libero_90")) == 90 and L.get_task("libero_90/0").max_steps == 400
    assert len(L.TASKS) == 130 and all(t.instruction for t in L.TASKS.values())
    assert L.get_task("libero_10/0").instruction == (
        "put both the alphabet soup and the tomato sauce in the basket")   # the scene prefix dropped


def test_seeds_map_to_init_states():
    seeds = L.eval_seeds(TASK, 50)
    assert seeds == list(suites.EVAL_SEEDS[:50])
    assert [L.init_state_index(s) for s in seeds] == list(range(50))
    assert L.demo_seeds(TASK, 3) == [0, 1, 2]
    assert not set(L.demo_seeds(TASK, 50)) & set(seeds)


def test_bad_names_and_indices_give_clear_errors():
    with pytest.raises(ValueError, match="not a LIBERO suite.*libero_spatial"):
        L.get_task("libero_space/0")
    with pytest.raises(ValueError, match="did you mean 'libero_spatial/pick_up_the_black_bowl_on_the_stove"):
        L.get_task("libero_spatial/pick_up_the_black_bowl_on_the_stov_and_place_it_on_the_plate")
    with pytest.raises(ValueError, match="tasks 0..9"):
        L.get_task("libero_goal/10")
    with pytest.raises(ValueError, match="unknown LIBERO suite"):
        L.suite_tasks("libero_100")
    with pytest.raises(ValueError, match="50 fixed init states"):
        L.eval_seeds(TASK, 51)
    for seed in (suites.EVAL_SEEDS[50], 3, -1, suites.EVAL_SEEDS.start - 1, True, 1.5):
        with pytest.raises(ValueError, match="starts no LIBERO init state"):
            L.init_state_index(seed)
    with pytest.raises(ValueError, match="starts no LIBERO init state"):
        L.make_env(TASK, seed=suites.EVAL_SEEDS[50])   # a seed is checked before anything is built
    with pytest.raises(ValueError, match="gripper must be one of"):
        L.make_env(TASK, gripper="open")
    with pytest.raises(ValueError, match="cameras must be"):
        L.make_env(TASK, cameras=("agentview",))


def test_a_missing_dependency_names_the_install_command(monkeypatch):
    monkeypatch.setattr(L, "_MODULES", None)                  # as if not yet imported
    monkeypatch.setattr(L, "_found", lambda module: module != "numba")
    with pytest.raises(ModuleNotFoundError, match="LIBERO needs numba.*pip install --no-deps hf-libero==0.1.4"):
        L.require()


def test_gripper_conversions():
    assert list(L.env_gripper([1.0, 0.0, 0.51, 0.5])) == [-1.0, 1.0, -1.0, 1.0]   # dataset: 1 open, 0 close
    assert list(L.dataset_gripper([-1.0, 1.0])) == [1.0, 0.0]                     # LIBERO: -1 open, +1 close
    assert list(L.dataset_gripper(L.env_gripper([0.0, 1.0]))) == [0.0, 1.0]


# ----------------------------------------------------------------------------------------------
# The environment

def test_bad_init_state_and_options(env):
    for bad in (50, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match=r"init_state must be an int in \[0, 50\)"):
            env.reset(options={"init_state": bad})
    for seed in (suites.EVAL_SEEDS[50], suites.EVAL_SEEDS.stop):
        with pytest.raises(ValueError, match="starts no LIBERO init state"):
            env.reset(seed=seed)
    with pytest.raises(ValueError, match="reset options"):
        env.reset(options={"init": 3})
    with pytest.raises(ValueError, match="7 finite numbers"):
        env.step(np.zeros(4, np.float32))


def test_reset_to_an_init_state_is_deterministic(env):
    a, info = env.reset(options={"init_state": 3})
    assert info == {"success": False, "instruction": env.instruction, "init_state": 3}
    other, _ = env.reset(seed=suites.EVAL_SEEDS[5])   # another scene in between
    b, _ = env.reset(seed=suites.EVAL_SEEDS[3])        # the same init state through its seed
    for key in ("image", "state"):
        assert np.array_equal(a[key], b[key]), key
    for view in L.CAMERAS:
        assert np.array_equal(a["views"][view], b["views"][view]), view
    assert not np.array_equal(a["state"], other["state"]) or not np.array_equal(a["image"], other["image"])
    assert env.steps == 0 and env.init_state == 3


def test_one_step_shapes_and_dtypes(env):
    obs, _ = env.reset(options={"init_state": 0})
    assert env.observation_space.contains(obs)
    assert env.action_space.shape == (7,) and env.action_space.dtype == np.float32
    obs, reward, terminated, truncated, info = env.step(np.zeros(7, np.float32))
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    assert obs["state"].shape == (8,) and obs["state"].dtype == np.float32 and np.all(np.isfinite(obs["state"]))
    assert set(obs["views"]) == {"image", "wrist_image"}
    for view in obs["views"].values():
        assert view.shape == (256, 256, 3) and view.dtype == np.uint8
    assert isinstance(reward, float) and (terminated, truncated) == (False, False)
    assert info["success"] is False and info["instruction"] == L.get_task(TASK).instruction
    assert env.unwrapped.instruction == info["instruction"]
    assert set(env.last_timing) == {"physics", "render", "preprocess"}


def test_zero_policy_rollout_and_truncation(env):
    """20 steps of the zero action: the arm holds still, the gripper closes (0 = close in the datasets'
    convention) and opens again on 1; with the limit set to 21 the next step truncates."""
    obs, _ = env.reset(options={"init_state": 1})
    start = obs["state"].copy()
    for _ in range(20):
        obs, reward, terminated, truncated, info = env.step(np.zeros(7, np.float32))
        assert not terminated and not truncated and reward == 0.0
    assert env.steps == 20
    assert np.abs(obs["state"][:3] - start[:3]).max() < 0.02            # the arm stayed (m)
    assert obs["state"][6] < start[6] - 0.015 and obs["state"][7] > start[7] + 0.015   # fingers closed
    task = env.task
    try:
        env.task = dataclasses.replace(task, max_steps=21)
        obs, _, terminated, truncated, _ = env.step(np.r_[np.zeros(6), 1.0].astype(np.float32))
        assert truncated and not terminated
    finally:
        env.task = task
    closed = obs["state"][6]
    for _ in range(3):
        obs, *_ = env.step(np.r_[np.zeros(6), 1.0].astype(np.float32))
    assert obs["state"][6] > closed + 0.005                              # 1 = open


# ----------------------------------------------------------------------------------------------
# The observation conventions of the LeRobot LIBERO datasets

def _upright_reference(env):
    """agentview as mujoco.Renderer draws it (rows top first: the camera's true, upright, unmirrored
    view), with robosuite's visibility options: an independent render to orient the env's frame by."""
    import mujoco

    sim = env._env.env.sim
    model, data = sim.model._model, sim.data._data
    renderer = mujoco.Renderer(model, L.CAMERA_SIZE, L.CAMERA_SIZE)
    try:
        renderer.update_scene(data, camera="agentview", scene_option=sim._render_context_offscreen.vopt)
        return renderer.render().copy()
    finally:
        renderer.close()


def _robot_base_row(env, size):
    """Row of the robot's base in the camera's upright view of side `size` (pinhole projection)."""
    sim = env._env.env.sim
    model, data = sim.model._model, sim.data._data
    cam = model.camera("agentview").id
    p = data.xpos[model.body("robot0_link0").id] - data.cam_xpos[cam]
    x, y, z = data.cam_xmat[cam].reshape(3, 3).T @ p           # camera frame: x right, y up, looking at -z
    f = 0.5 * size / np.tan(np.deg2rad(model.cam_fovy[cam]) / 2)
    return 0.5 * size - f * y / -z


def test_env_frames_are_turned_half_a_turn_like_the_datasets(env):
    """The env's agentview is the camera's view turned 180 degrees from what robosuite renders: upright
    (robot at the top) and mirrored left-right against a true top-row-first render. Fails if the turn is
    dropped, made a flip of one axis, or the channels are swapped."""
    env.reset(options={"init_state": 0})
    view, up = env.views["image"].astype(np.float64), _upright_reference(env).astype(np.float64)
    candidates = {"as rendered upright": up, "upside down": up[::-1], "mirrored (the datasets')": up[:, ::-1],
                  "upside down and mirrored": up[::-1, ::-1], "mirrored, BGR": up[:, ::-1, ::-1]}
    err = {k: np.abs(view - c).mean() for k, c in candidates.items()}
    best = min(err, key=err.get)
    assert best == "mirrored (the datasets')", err
    assert err[best] < 3.0 and min(v for k, v in err.items() if k != best) > 3 * err[best] + 5, err
    assert _robot_base_row(env, L.CAMERA_SIZE) < 0.4 * L.CAMERA_SIZE   # the robot at the top, as the datasets have it
    assert np.array_equal(env.render(), env.views["image"])


def test_env_frame_and_dataset_frame_go_through_one_mapping(env):
    """A stored LeRobot LIBERO frame and an env frame reach the model through the same model_frame: same
    layout (HWC uint8 0..255 RGB, tiles left to right), the stored orientation and colours kept."""
    from bridges.lerobot import LeRobotEpisodes

    root = FIXTURE / "libero_like"
    expected = json.loads((FIXTURE / "expected.json").read_text())["libero_like"]["episodes"][0]
    info = json.loads((root / "meta" / "info.json").read_text())["features"]
    assert set(L.CAMERA_FEATURES.values()) <= set(info)
    assert info["observation.state"]["shape"] == [L.STATE_DIM] and info["action"]["shape"] == [L.ACTION_DIM]
    features = [L.CAMERA_FEATURES[c] for c in ("image", "wrist_image")]
    ds = LeRobotEpisodes(root, cameras=features, image_size=64)
    stored = {c: ds.camera_frames(0, L.CAMERA_FEATURES[c]) for c in L.CAMERA_FEATURES}   # (T, 64, 64, 3)
    tiled = L.model_frame(stored, 64, cameras=("image", "wrist_image"))
    assert np.array_equal(tiled, ds.frames(0))             # the dataset loader's frames, bit for bit
    primary = L.model_frame(stored, 64)[0].astype(np.float64)
    # episode 0, frame 0: grey 20 with a red (220, 40, 40) square at rows 8..23, columns 0..15
    assert np.allclose(primary.mean(axis=(0, 1)), expected["mean_rgb_0_255"]["observation.images.image"]["frame_0"],
                       atol=2.0)
    square, background = primary[8:24, 0:16].mean(axis=(0, 1)), primary[40:, 32:].mean(axis=(0, 1))
    assert square[0] > 180 and square[1] < 80 and square[2] < 80, square   # red on top-left: not flipped, RGB
    assert np.abs(background - 20).max() < 6, background
    left, right = tiled[0, :, :32].astype(np.float64), tiled[0, :, 32:].astype(np.float64)
    assert left.mean() < 60 < 180 < right.mean()           # primary (dark ramp) left, wrist (light) right

    obs, _ = env.reset(options={"init_state": 0})
    frame = L.model_frame(env.views, 64)
    assert np.array_equal(frame, obs["image"]) and frame.shape == primary.shape and frame.dtype == np.uint8
    assert 20 < frame.mean() < 235 and frame.min() < 60 and frame.max() > 180   # a lit scene over 0..255
    both = L.model_frame(env.views, 64, cameras=("image", "wrist_image"))
    from bridges.frames import model_frames
    assert np.array_equal(both, model_frames([env.views["image"], env.views["wrist_image"]], 64))


def test_state_layout_matches_the_datasets(env):
    """state = eef position 3, axis-angle 3, finger joints 2 (+q, -q), as LIBERO's raw observation gives
    them and as the dataset's state rows are laid out."""
    import mujoco

    expected = json.loads((FIXTURE / "expected.json").read_text())["libero_like"]["episodes"][0]["state_first"]
    obs, _ = env.reset(options={"init_state": 0})
    s, raw = obs["state"].astype(np.float64), env.raw_observation
    assert np.allclose(s[:3], raw["robot0_eef_pos"], atol=1e-6)
    assert np.allclose(s[6:], raw["robot0_gripper_qpos"], atol=1e-6)
    x, y, z, w = raw["robot0_eef_quat"]
    from_quat, from_axis_angle = np.zeros(9), np.zeros(9)
    mujoco.mju_quat2Mat(from_quat, np.array([w, x, y, z]))
    angle = np.linalg.norm(s[3:6])
    q = np.zeros(4)
    mujoco.mju_axisAngle2Quat(q, s[3:6] / angle, angle)
    mujoco.mju_quat2Mat(from_axis_angle, q)
    assert np.allclose(from_quat, from_axis_angle, atol=1e-5)
    # the gripper points down (axis-angle near pi about x) and the fingers are +q, -q, as in the dataset rows
    assert abs(abs(s[3]) - abs(expected[3])) < 0.3 and abs(s[4]) < 0.3 and abs(s[5]) < 0.3
    assert s[6] > 0.01 > -0.01 > s[7] and expected[6] > 0 > expected[7]
    assert abs(s[6] - expected[6]) < 0.01 and abs(s[7] - expected[7]) < 0.01


def test_primary_view_only_and_fast_rendering():
    """views=("image",) renders the primary camera only; render_quality="fast" gives nearly the same frame."""
    with pytest.raises(ValueError, match="views must be names"):
        L.make_env(TASK, cameras=("image", "wrist_image"), views=("image",))
    with pytest.raises(ValueError, match="render_quality must be one of"):
        L.make_env(TASK, render_quality="draft")
    env = L.make_env(TASK, image_size=32, views=("image",), render_quality="fast")
    try:
        obs, _ = env.reset(options={"init_state": 0})
        assert set(obs["views"]) == {"image"} and env.observation_space.contains(obs)
        assert isinstance(env, L.LiberoEnv) and env.render_quality == "fast"
        ctx = env._env.env.sim._render_context_offscreen
        import mujoco
        assert ctx.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] == 0 and env._env.env.sim.model.vis.quality.offsamples == 0
        obs, *_ = env.step(np.zeros(7, np.float32))
        assert obs["image"].shape == (32, 32, 3) and 20 < obs["image"].mean() < 235
    finally:
        env.close()


# ----------------------------------------------------------------------------------------------
# Demo layouts and the scripted experts

def _object_positions(env):
    sim = env._env.env.sim
    return np.array([sim.data._data.xpos[env._env.env.obj_body_id[n]] for n in env._env.env.objects_dict])


def test_demo_seeds_draw_new_layouts_never_an_init_state():
    """reset(seed=demo seed) is LIBERO's own placement sampler, seeded by (task, seed): the same seed gives
    the same scene, another seed another one, and none is one of the evaluation's fixed init states."""
    env = L.make_env(TASK, render_quality="none")
    try:
        layouts = []
        for seed in (0, 1, 0):
            obs, info = env.reset(seed=suites.DEMO_SEEDS[seed])
            assert info["init_state"] is None and set(obs) == {"state"} and env.episode_seed == seed
            layouts.append(_object_positions(env))
        assert np.array_equal(layouts[0], layouts[2])
        assert np.abs(layouts[0] - layouts[1]).max() > 0.01
        inits = []
        for i in range(5):
            env.reset(options={"init_state": i})
            inits.append(_object_positions(env))
        closest = min(np.abs(layout - init).max() for layout in layouts for init in inits)
        assert closest > 0.005, closest
        assert L.layout_seed(TASK, 0) != L.layout_seed("libero_spatial/1", 0)   # tasks draw their own layouts
    finally:
        env.close()


@pytest.mark.parametrize("task", ["libero_object/1", "libero_spatial/3"])
def test_scripted_expert_places_the_object(task):
    """The expert solves a flat box into the basket (libero_object: a grasp yaw that keeps the hand off the
    neighbouring bottles) and a bowl onto the plate by its rim (libero_spatial), from init state 0, with
    actions in the env's convention (dataset: the gripper 1 open, 0 closed)."""
    env = L.make_env(task, render_quality="none")
    try:
        obs, _ = env.reset(options={"init_state": 0})
        expert = L.scripted_expert(env)
        grips = []
        for _ in range(env.task.max_steps):
            action = expert(obs)
            assert action.shape == (7,) and action.dtype == np.float32 and np.all(np.abs(action) <= 1)
            grips.append(action[6])
            obs, _, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                break
        assert info["success"], (task, expert.phase)
        assert set(grips) == {0.0, 1.0} and grips[0] == 1.0
    finally:
        env.close()


def test_scripted_expert_refuses_other_goals():
    env = L.make_env("libero_goal/0", render_quality="none")   # open the middle drawer of the cabinet
    try:
        env.reset(options={"init_state": 0})
        with pytest.raises(ValueError, match="places one object on or in a target; the goal is"):
            L.scripted_expert(env)
    finally:
        env.close()


def test_scripted_demos_as_a_lerobot_dataset(tmp_path):
    """train_toy's LIBERO demos: a LeRobot v3.0 dataset in the LeRobot LIBERO datasets' layout that the
    reader opens, whose stored frames are the env's frames in the datasets' orientation (the half turn),
    whose state rows are the env's state and whose gripper actions are 1 = open, 0 = closed."""
    import train_toy
    from bridges.lerobot import LeRobotEpisodes

    task = L.suite_tasks("libero_object")[0]
    path = train_toy.collect_dataset([task], 1, tmp_path / "demos", suite="libero", progress=False)
    info = json.loads((Path(path) / "meta" / "info.json").read_text())
    assert info["fps"] == 20 and info["robot_type"] == "panda" and info["total_episodes"] == 1
    for key in L.CAMERA_FEATURES.values():
        assert info["features"][key]["shape"] == [L.CAMERA_SIZE, L.CAMERA_SIZE, 3]
    for key, names in L.DATASET_NAMES.items():
        assert info["features"][key]["names"] == names
    ds = LeRobotEpisodes(path, cameras=list(L.CAMERA_FEATURES.values()), image_size=128)
    episode = ds.episode(0)
    assert episode["task"] == task and episode["instruction"] == L.get_task(task).instruction
    grip = episode["action"][:, 6]
    assert set(np.unique(grip)) == {0.0, 1.0} and grip[0] == 1.0 and grip[-1] == 1.0

    env = L.make_env(task, image_size=64)
    try:
        obs, _ = env.reset(seed=suites.DEMO_SEEDS[0])
        assert np.array_equal(episode["state"][0], obs["state"])
        for name, key in L.CAMERA_FEATURES.items():
            stored = ds.camera_frames(0, key)[0].astype(np.float64)            # (256, 256, 3), decoded
            view = obs["views"][name].astype(np.float64)
            err = {"as the env shows it": np.abs(stored - view).mean(), "upside down": np.abs(stored - view[::-1]).mean(),
                   "mirrored": np.abs(stored - view[:, ::-1]).mean(), "BGR": np.abs(stored - view[..., ::-1]).mean()}
            assert err["as the env shows it"] < 3.0, (name, err)                # AV1's loss only
            assert min(err.values()) == err["as the env shows it"], (name, err)
    finally:
        env.close()


def test_train_toy_libero_flags():
    """--libero-suite names all tasks of a suite (with --suite libero only, instead of --tasks); the run
    evaluates 10 init states per task and renders only the cameras it trained on."""
    import train_toy

    def parse(*argv):
        args = train_toy.build_parser().parse_args(list(argv))
        train_toy.validate_args(args)
        return args

    args = parse("--suite", "libero", "--libero-suite", "libero_object")
    assert args.tasks == L.suite_tasks("libero_object") and args.eval_episodes == train_toy.LIBERO_EVAL_EPISODES
    assert train_toy.eval_options(args) == {"workers": train_toy.DEMO_WORKERS, "batch_size": train_toy.LIBERO_EVAL_BATCH,
                                            "env_options": {"cameras": ("image",), "views": ("image",)}}
    both = parse("--suite", "libero", "--libero-suite", "libero_spatial", "--cameras", *L.CAMERA_FEATURES.values())
    assert train_toy.eval_options(both)["env_options"]["cameras"] == ("image", "wrist_image")
    assert train_toy.eval_options(parse("--steps", "5")) == {}
    for argv, message in [(("--libero-suite", "libero_object"), "give it with --suite libero"),
                          (("--suite", "libero", "--libero-suite", "libero_object", "--tasks", TASK), "instead of --tasks"),
                          (("--suite", "libero", "--libero-suite", "libero_100"), "unknown LIBERO suite"),
                          (("--suite", "libero", "--libero-suite", "libero_object", "--cameras", "observation.images.top"),
                           "LIBERO's demo datasets have the cameras")]:
        with pytest.raises(ValueError, match=message):
            parse(*argv)
    dirs = {train_toy.demo_dataset_dir("c", "libero", L.suite_tasks("libero_object"), n, "libero_object") for n in (10, 20)}
    assert len(dirs) == 2 and all("libero_object" in d for d in dirs)
