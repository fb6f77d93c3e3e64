"""suites/metaworld.py: Meta-World behind the suite interface (observation, experts, episode files,
report, bad task names, the missing-install error), and train_toy.py on it end to end.

Meta-World is optional: where it is not installed these tests are skipped, except in CI
(CI=true), which installs it (.ci/run) and where a missing Meta-World fails them."""
import json
import os
import re
import sys
import types

import numpy as np
import pytest
import torch

import dit4dit
import eval_sim as es
from suites import metaworld as ms
import train_toy
import suites
from bridges import checkpoint, episodes
from bridges.normalizer import Normalizer
from suites import toy

try:
    import metaworld  # noqa: F401
    HAVE_METAWORLD = True
except ImportError:
    HAVE_METAWORLD = False
needs_metaworld = pytest.mark.skipif(not HAVE_METAWORLD and not os.environ.get("CI"),
                                     reason=f"Meta-World is not installed ({ms.INSTALL_HINT})")


@needs_metaworld
def test_reset_step_render_shapes_and_what_the_state_holds():
    env = ms.make_env("push-v3", image_size=32)
    obs, info = env.reset(seed=suites.EVAL_SEEDS[0])
    assert set(obs) == {"image", "state"} and env.observation_space.contains(obs)
    assert obs["image"].shape == (32, 32, 3) and obs["image"].dtype == np.uint8
    assert obs["state"].shape == (ms.STATE_DIM,) and obs["state"].dtype == np.float32
    u = env.unwrapped
    assert info["instruction"] == u.instruction == "push the puck to the goal"
    np.testing.assert_allclose(obs["state"][:3], u.mw.get_endeff_pos(), atol=1e-6)  # the hand, not the puck
    obs2, reward, terminated, truncated, info = env.step(np.array([1.0, 0.0, 0.0, -1.0], np.float32))
    assert obs2["image"].shape == (32, 32, 3) and obs2["state"][0] > obs["state"][0]  # moved along +x
    assert reward == 0.0 and not terminated and not truncated and info["success"] is False
    np.testing.assert_array_equal(env.render(), obs2["image"])
    with pytest.raises(ValueError, match="action"):
        env.step(np.zeros(2))
    with pytest.raises(ValueError, match="no pads"):
        env.reset(seed=0, options={"target": 1})

    # same seed, same scene (in a fresh env too); another seed moves puck and goal, and only the
    # image shows it: the state at reset is the same hand pose
    other = ms.make_env("push-v3", image_size=32)
    again, _ = other.reset(seed=suites.EVAL_SEEDS[0])
    np.testing.assert_array_equal(again["image"], obs["image"])
    np.testing.assert_array_equal(again["state"], obs["state"])
    moved, _ = other.reset(seed=suites.EVAL_SEEDS[1])
    assert not np.array_equal(moved["image"], obs["image"])
    np.testing.assert_allclose(moved["state"], obs["state"], atol=1e-6)
    env.close()
    other.close()


@needs_metaworld
def test_episode_truncated_at_max_steps():
    env = ms.make_env("reach-v3", image_size=16)
    env.reset(seed=0)
    for _ in range(ms.MAX_STEPS - 1):
        assert env.step(np.zeros(4, np.float32))[3] is False
    _, _, terminated, truncated, info = env.step(np.zeros(4, np.float32))
    assert truncated and not terminated and not info["success"]
    env.close()


@needs_metaworld
@pytest.mark.parametrize("task", ["reach-v3", "push-v3", "pick-place-v3"])
def test_expert_succeeds_on_eval_seeds(task):
    for seed in ms.eval_seeds(task, 2):
        ep = es.collect_episode(task, seed, image_size=16, suite="metaworld")
        assert ep["success"], f"{task} seed {seed}"
        T = len(ep["action"])
        assert 1 <= T <= ms.MAX_STEPS
        assert ep["frames"].shape == (T + 1, 16, 16, 3) and ep["frames"].dtype == np.uint8
        assert ep["state"].shape == (T + 1, ms.STATE_DIM) and ep["action"].shape == (T, ms.ACTION_DIM)
        assert np.all(np.abs(ep["action"]) <= 1.0)
        assert ep["instruction"] == ms.INSTRUCTIONS[task] and ep["task"] == task


@needs_metaworld
def test_every_task_has_an_instruction_and_an_expert():
    import metaworld.env_dict
    import metaworld.policies

    assert set(ms.TASKS) == set(metaworld.env_dict.ALL_V3_ENVIRONMENTS) == set(metaworld.policies.ENV_POLICY_MAP)
    assert len({t.instruction for t in ms.TASKS.values()}) == len(ms.TASKS)  # one sentence per task


@needs_metaworld
def test_demos_round_trip_through_the_cache(tmp_path):
    eps = train_toy.collect_demos(["reach-v3"], 2, 16, str(tmp_path), progress=False, suite="metaworld")
    files = sorted(p.name for p in tmp_path.glob("*/*.npz"))
    assert files == ["seed_000000.npz", "seed_000001.npz"]  # one episode per seed: no pads
    again = train_toy.collect_demos(["reach-v3"], 2, 16, str(tmp_path), progress=False, suite="metaworld")
    for a, b in zip(eps, again):
        back = episodes.load_episode(b["path"])
        for key in ("frames", "state", "action"):
            np.testing.assert_array_equal(a[key], back[key])
            assert back[key].dtype == a[key].dtype
        assert (back["instruction"], back["task"], back["success"]) == ("move the gripper to the goal", "reach-v3", True)
    assert [e["seed"] for e in again] == list(suites.DEMO_SEEDS[:2])


@needs_metaworld
def test_evaluate_expert_report(tmp_path):
    report = es.evaluate("expert", tasks=["reach-v3"], episodes=2, out_dir=str(tmp_path), gif_episodes=1,
                         image_size=16, progress=False, suite="metaworld")
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["overall"] == json.loads(json.dumps(report["overall"]))
    assert on_disk["tasks"]["reach-v3"]["successes"] == 2 and on_disk["tasks"]["reach-v3"]["n"] == 2
    m = on_disk["manifest"]
    assert m["config"]["suite"] == "metaworld" and m["config"]["policy"] == "scripted_expert"
    assert m["config"]["control_hz"] == pytest.approx(80.0) and m["config"]["max_steps"] == {"reach-v3": ms.MAX_STEPS}
    assert m["seeds"] == {"reach-v3": list(suites.EVAL_SEEDS[:2])} and "metaworld" in m["packages"]
    assert [e["instruction"] for e in on_disk["episodes"]] == ["move the gripper to the goal"] * 2
    assert os.listdir(tmp_path / "gifs") == [f"reach-v3_seed{suites.EVAL_SEEDS[0]}.gif"]


@needs_metaworld
def test_dit4dit_policy_on_metaworld_and_a_toy_model_refused(tmp_path):
    torch.manual_seed(0)
    config = dit4dit.make_config("tiny", state_dim=ms.STATE_DIM, action_dim=ms.ACTION_DIM)
    ckpt = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(ckpt, dit4dit.DiT4DiT(config), Normalizer(-torch.ones(4), torch.ones(4)),
                            Normalizer(-torch.ones(4), torch.ones(4)), step=1)
    policy = es.load_policy(str(ckpt), execute_steps=config.action_horizon)
    report = es.evaluate(policy, tasks=["reach-v3"], episodes=1, out_dir=str(tmp_path / "eval"), gif_episodes=0,
                         progress=False, suite="metaworld")
    assert report["episodes"][0]["error"] is None and report["episodes"][0]["steps"] >= 1
    toy_config = dit4dit.make_config("tiny", state_dim=toy.STATE_DIM, action_dim=toy.ACTION_DIM)
    checkpoint.save_checkpoint(tmp_path / "toy.pt", dit4dit.DiT4DiT(toy_config), Normalizer(-torch.ones(2), torch.ones(2)),
                            Normalizer(-torch.ones(2), torch.ones(2)), step=1)
    with pytest.raises(ValueError, match="state of 2 numbers.*metaworld suite gives 4"):
        es.evaluate(es.load_policy(str(tmp_path / "toy.pt")), tasks=["reach-v3"], episodes=1,
                    out_dir=str(tmp_path / "no"), progress=False, suite="metaworld")


@needs_metaworld
def test_bad_task_and_suite_names_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown Meta-World task 'reach'; did you mean 'reach-v3'"):
        ms.make_env("reach")
    with pytest.raises(ValueError, match="unknown Meta-World task 'push'"):
        es.evaluate("expert", tasks=["push"], episodes=1, out_dir=str(tmp_path / "x"), progress=False,
                    suite="metaworld")
    with pytest.raises(ValueError, match="unknown task 'reach-v3'"):  # a Meta-World name in the toy suite
        es.evaluate("expert", tasks=["reach-v3"], episodes=1, out_dir=str(tmp_path / "x"), progress=False)
    with pytest.raises(ValueError, match="unknown suite 'robocasa'"):
        suites.get_suite("robocasa")
    out = tmp_path / "out"
    for argv, message in [(["--suite", "metaworld", "--expert", "--tasks", "fly-v3"], "unknown Meta-World task 'fly-v3'"),
                          (["--suite", "metaworld", "--bench"], "name the tasks to time with --tasks")]:
        with pytest.raises(SystemExit) as exit_info:
            es.cli([*argv, "--out", str(out)])
        text = str(exit_info.value.code)
        assert text.startswith("eval_sim.py: error: ") and "\n" not in text and re.search(message, text), text
    assert not out.exists()
    for argv, message in [(["--tasks", "reach"], "--tasks: unknown task 'reach'"),
                          ([], "--suite metaworld: name the tasks")]:
        with pytest.raises(SystemExit) as exit_info:
            train_toy.cli(["--suite", "metaworld", *argv, "--out", str(out)])
        assert re.search(message, str(exit_info.value.code)), exit_info.value.code
    assert not out.exists()


def test_missing_metaworld_names_the_install_command(monkeypatch, tmp_path):
    # runs with or without Meta-World installed: a None entry in sys.modules makes `import` fail
    monkeypatch.setitem(sys.modules, "metaworld", None)
    monkeypatch.setitem(sys.modules, "metaworld.policies", None)
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install metaworld")):
        suites.get_suite("metaworld")
    with pytest.raises(SystemExit) as exit_info:
        es.cli(["--suite", "metaworld", "--expert", "--tasks", "reach-v3", "--out", str(tmp_path / "out")])
    text = str(exit_info.value.code)
    assert text.startswith("eval_sim.py: error: Meta-World is not installed") and "pip install metaworld" in text
    with pytest.raises(SystemExit, match="pip install metaworld"):
        train_toy.cli(["--suite", "metaworld", "--tasks", "reach-v3", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_mocap_weld_reset_fits_any_eq_data_width():
    """Meta-World writes an 11-number weld row; mujoco 4.0 has 12 per row. Ours writes the
    first 11, leaves the rest as the model has them, and leaves rows of other equality types alone."""
    import mujoco

    model = mujoco.MjModel.from_xml_string("""
<mujoco>
  <worldbody>
    <body name="mocap" mocap="true"/>
    <body name="hand"><freejoint/><geom size="0.01"/></body>
    <body name="other"><joint name="j1"/><geom size="0.01"/></body>
    <body name="other2"><joint name="j2"/><geom size="0.01"/></body>
  </worldbody>
  <equality>
    <weld body1="mocap" body2="hand"/>
    <joint joint1="j1" joint2="j2"/>
  </equality>
</mujoco>""")
    weld_tail, joint_row = model.eq_data[0, 11:].copy(), model.eq_data[1].copy()
    ms._reset_mocap_welds(types.SimpleNamespace(model=model))
    np.testing.assert_array_equal(model.eq_data[0, :11], [0, 0, 0, 0, 0, 0, -1, 0, 0, 0, 5])
    np.testing.assert_array_equal(model.eq_data[0, 11:], weld_tail)
    np.testing.assert_array_equal(model.eq_data[1], joint_row)


@needs_metaworld
def test_train_then_evaluate_on_metaworld(tmp_path, monkeypatch):
    # the demos first (cached; the run reuses them), then evaluation episodes of 20 steps (the
    # untrained policy would use all MAX_STEPS): a fast test
    train_toy.collect_demos(["reach-v3"], 2, dit4dit.make_config("tiny").image_size, str(tmp_path / "demos"),
                            progress=False, suite="metaworld")
    monkeypatch.setitem(ms.TASKS, "reach-v3", ms.MetaWorldTask("reach-v3", ms.INSTRUCTIONS["reach-v3"], 20))
    report = train_toy.main(train_toy.build_parser().parse_args(
        ["--suite", "metaworld", "--tasks", "reach-v3", "--preset", "tiny", "--steps", "2", "--batch-size", "4",
         "--threads", "1", "--demos-per-task", "2", "--eval-episodes", "1", "--out", str(tmp_path / "run"),
         "--demo-cache", str(tmp_path / "demos")]))
    assert report["manifest"]["config"]["suite"] == "metaworld" and set(report["tasks"]) == {"reach-v3"}
    assert report["manifest"]["config"]["max_steps"] == {"reach-v3": 20}
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert (ckpt["config"]["state_dim"], ckpt["config"]["action_dim"]) == (ms.STATE_DIM, ms.ACTION_DIM)
    assert sorted(p.name for p in (tmp_path / "demos").glob("*/*.npz")) == ["seed_000000.npz", "seed_000001.npz"]
