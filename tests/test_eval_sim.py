"""eval_sim.py: the toy suite (determinism, experts, what the observation holds, success tests),
the episode format, the evaluation report and the DiT4DiT rollout wrapper."""
import dataclasses
import json
import os
import re

import numpy as np
import pytest
import torch

import eval_sim as es
import suites
from bridges import checkpoint, episodes
from bridges.files import file_sha256
from bridges.normalizer import Normalizer
from suites import toy


def test_same_seed_same_frames_and_states():
    for task in toy.TASKS:
        runs = []
        for _ in range(2):
            env = toy.make_env(task, image_size=32)
            obs, _ = env.reset(seed=suites.EVAL_SEEDS[3])
            expert = toy.scripted_expert(env)
            frames, states = [obs["image"]], [obs["state"]]
            for _ in range(6):
                obs, *_ = env.step(expert(obs))
                frames.append(obs["image"])
                states.append(obs["state"])
            runs.append((np.stack(frames), np.stack(states), env.unwrapped.instruction))
            env.close()
        np.testing.assert_array_equal(runs[0][0], runs[1][0])
        np.testing.assert_array_equal(runs[0][1], runs[1][1])
        assert runs[0][2] == runs[1][2]
        other = toy.make_env(task, image_size=32)
        obs, _ = other.reset(seed=suites.EVAL_SEEDS[4])
        assert not np.array_equal(obs["image"], runs[0][0][0])  # a different seed, a different scene
        other.close()


def test_demo_and_eval_seeds_are_disjoint():
    assert set(toy.demo_seeds("push", 1000)).isdisjoint(toy.eval_seeds("push", 1000))
    assert suites.DEMO_SEEDS.stop <= suites.EVAL_SEEDS.start


@pytest.mark.parametrize("task", sorted(toy.TASKS))
def test_expert_succeeds_on_eval_seeds(task):
    for seed in toy.eval_seeds(task, 10):
        ep = es.collect_episode(task, seed, image_size=32)
        assert ep["success"], f"{task} seed {seed}"
        T = len(ep["action"])
        assert 1 <= T <= toy.TASKS[task].max_steps
        assert ep["frames"].shape == (T + 1, 32, 32, 3) and ep["frames"].dtype == np.uint8
        assert ep["state"].shape == (T + 1, toy.STATE_DIM) and ep["action"].shape == (T, toy.ACTION_DIM)
        assert np.all(np.abs(ep["action"]) <= 1.0)


@pytest.mark.parametrize("task", sorted(toy.TASKS))
def test_one_layout_demonstrated_toward_every_pad(task):
    """collect_episode(target=i): the same layout (same first frame) toward each pad in turn, with
    the instruction naming that pad, and the expert succeeds on every one."""
    seed = toy.demo_seeds(task, 3)[2]
    eps = [es.collect_episode(task, seed, image_size=32, target=i) for i in range(toy.TASKS[task].num_pads)]
    for ep in eps[1:]:
        np.testing.assert_array_equal(ep["frames"][0], eps[0]["frames"][0])
    assert len({ep["instruction"] for ep in eps}) == len(eps)
    assert all(ep["success"] for ep in eps)
    assert len({tuple(np.round(ep["action"][0], 3)) for ep in eps}) == len(eps)  # different first moves
    with pytest.raises(ValueError, match="options\\['target'\\]"):
        toy.make_env(task, image_size=32).reset(seed=seed, options={"target": 7})


def test_demo_noise_perturbs_the_execution_and_records_the_experts_commands(monkeypatch):
    """collect_episode(noise=σ) (DART): the env executes the expert's command plus N(0, σ²) noise,
    the episode records the expert's clean command at every visited state, and the same call
    gives the same episode."""
    calls = {"expert": [], "executed": []}
    make_env, make_expert = toy.make_env, toy.scripted_expert

    def recording_env(*args, **kwargs):
        env = make_env(*args, **kwargs)
        step = env.step
        env.step = lambda action: (calls["executed"].append(np.array(action)), step(action))[1]
        return env

    def recording_expert(env):
        expert = make_expert(env)
        return lambda obs: (lambda a: (calls["expert"].append(a.copy()), a)[1])(expert(obs))

    monkeypatch.setattr(toy, "make_env", recording_env)
    monkeypatch.setattr(toy, "scripted_expert", recording_expert)
    clean = es.collect_episode("push", 3, image_size=16, target=0)
    np.testing.assert_array_equal(np.stack(calls["executed"]), clean["action"])  # no noise: executed as recorded
    diffs = []
    for seed in range(3, 9):
        calls["expert"].clear(), calls["executed"].clear()
        ep = es.collect_episode("push", seed, image_size=16, target=0, noise=0.3)
        np.testing.assert_array_equal(np.stack(calls["expert"]), ep["action"])  # the expert's clean commands
        executed = np.stack(calls["executed"])
        assert np.all(np.abs(executed) <= 1.0)
        inside = np.abs(executed) < 1.0  # not clipped
        diffs.append((executed - ep["action"])[inside])
    diffs = np.concatenate(diffs)
    assert len(diffs) > 60 and 0.2 < diffs.std() < 0.4 and abs(diffs.mean()) < 0.1, (len(diffs), diffs.std())
    again = es.collect_episode("push", 8, image_size=16, target=0, noise=0.3)
    np.testing.assert_array_equal(again["state"], ep["state"])
    assert not np.array_equal(es.collect_episode("push", 3, image_size=16, target=0, noise=0.3)["state"],
                              clean["state"])


def test_push_starts_behind_the_puck_for_every_pad():
    # whichever pad is named, the end-effector starts behind the puck on the line from the pad
    env = toy.make_env("push", image_size=16)
    for seed in range(40):
        env.reset(seed=seed)
        u = env.unwrapped
        puck, ee = u.puck_pos(), u.ee_pos()
        for pad in u.pad_pos():
            along = (ee - puck) @ (pad - puck) / np.linalg.norm(pad - puck)
            assert along <= -toy.PUSH_START_BEHIND + 1e-9, (seed, along)
    env.close()


def test_push_expert_changes_its_action_smoothly_behind_the_puck():
    # No hard switch behind the puck: sliding the end-effector sideways across the push line in
    # 1 mm steps changes the command by a little each step, so position errors matter little.
    env = toy.make_env("push", image_size=16)
    env.reset(seed=0)
    u = env.unwrapped
    pads, puck = [[0.0, 0.2], [0.2, 0.15]], np.array([0.0, -0.05])
    expert = toy.scripted_expert(env)
    actions = []
    for side in np.arange(-0.06, 0.0605, 0.001):
        u.set_layout([side, -0.05 - 0.1], pads, ["red", "blue"], 0, puck=puck)  # 0.1 m behind, pushing +y
        actions.append(expert())
    steps = np.linalg.norm(np.diff(np.array(actions), axis=0), axis=1)
    assert steps.max() < 0.08, steps.max()  # a hard switch would move it by ~1 in one step
    assert np.linalg.norm(actions[len(actions) // 2]) == pytest.approx(0.6, abs=1e-6)  # on the line: push
    env.close()


def test_push_expert_tolerates_a_misjudged_puck():
    """The push expert still succeeds when it sees the puck off by a fixed N(0, (2 cm)²) per axis
    for the whole episode (a learner's view is that rough: ~1 px/cm at 64 px): 140/150 layouts
    at DEMO_FORMAT 4 (115/150 with the expert before it), so >= 54/60 here."""
    rng = np.random.default_rng(0)
    successes = 0
    for seed in toy.eval_seeds("push", 60):
        env = toy.make_env("push", image_size=16)
        env.reset(seed=seed)
        u = env.unwrapped
        error = rng.normal(0.0, 0.02, 2)

        class Misjudged:  # what the expert reads: the true env, but the puck moved by `error`
            task, ee_pos, target_pos = u.task, u.ee_pos, u.target_pos
            puck_pos = staticmethod(lambda: u.puck_pos() + error)

        expert = toy.scripted_expert(type("Wrapper", (), {"unwrapped": Misjudged})())
        for _ in range(u.task.max_steps):
            _, _, terminated, truncated, info = env.step(expert())
            if terminated or truncated:
                break
        successes += info["success"]
        env.close()
    assert successes >= 54, successes


def test_observation_holds_no_object_or_goal_position():
    env = toy.make_env("push", image_size=32)
    obs, _ = env.reset(seed=5)
    assert set(obs) == {"image", "state"} and obs["state"].shape == (toy.STATE_DIM,)
    u = env.unwrapped
    ee = u.ee_pos()
    a = u.set_layout(ee, [[-0.2, -0.2], [0.2, 0.2]], ["red", "blue"], 0, puck=[0.0, 0.1])
    b = u.set_layout(ee, [[0.1, -0.15], [-0.2, 0.15]], ["green", "red"], 1, puck=[-0.1, -0.05])
    np.testing.assert_array_equal(a["state"], b["state"])          # objects moved, state unchanged
    np.testing.assert_allclose(a["state"], ee, atol=1e-6)  # the end-effector position only
    assert not np.array_equal(a["image"], b["image"])              # the scene is in the image
    env.close()


def test_success_on_hand_placed_states():
    h = toy.PAD_HALF
    env = toy.make_env("reach", image_size=32)
    env.reset(seed=0)
    u = env.unwrapped
    pads = [[-0.2, 0.0], [0.0, 0.2], [0.2, -0.1]]
    for ee, target, expected in [([-0.2 + h - 0.005, 0.0], 0, True), ([-0.2 + h + 0.01, 0.0], 0, False),
                                 ([0.0, 0.2], 0, False), ([0.0, 0.2], 1, True)]:
        u.set_layout(ee, pads, ["red", "green", "blue"], target)
        assert u.is_success() == expected, (ee, target)
    u.set_layout([-0.2 + h - 0.005, 0.0], pads, ["red", "green", "blue"], 0)
    _, reward, terminated, truncated, info = env.step(np.zeros(2, np.float32))
    assert terminated and not truncated and info["success"] and reward == 1.0
    env.close()

    env = toy.make_env("push", image_size=32)
    env.reset(seed=0)
    u = env.unwrapped
    pads = [[-0.15, 0.0], [0.15, 0.0]]
    for puck, ee, target, expected in [([-0.15, 0.05], [0.2, -0.2], 0, True),
                                       ([-0.15, 0.07], [0.2, -0.2], 0, False),
                                       ([-0.15, 0.0], [0.2, -0.2], 1, False),   # on the other pad
                                       ([0.0, -0.2], [0.15, 0.0], 1, False)]:   # the end-effector is not the puck
        u.set_layout(ee, pads, ["blue", "green"], target, puck=puck)
        assert u.is_success() == expected, (puck, ee, target)
    assert u.instruction == "push the puck onto the green pad"
    env.close()
    pads = np.array([[0.1 + h, 0.1 - h], [-0.2, -0.2]])
    assert toy.pad_under([0.1, 0.1], pads) == 0 and toy.pad_under([-0.2, -0.2 + h + 0.001], pads) is None


def test_coming_onto_a_wrong_pad_ends_the_episode_as_a_failure():
    env = toy.make_env("reach", image_size=16)
    env.reset(seed=0)
    u = env.unwrapped
    pads = [[-0.2, 0.0], [0.0, 0.2], [0.2, -0.1]]
    u.set_layout([0.0, 0.2 - toy.PAD_HALF - 0.01], pads, ["red", "green", "blue"], 0)  # just below pad 1
    obs, reward, terminated, truncated, info = env.step(np.array([0.0, 1.0], np.float32))  # onto pad 1
    assert u.pad_under() == 1
    assert terminated and not truncated and not info["success"] and info["wrong_pad"] and reward == 0.0
    env.close()


def test_instruction_decides_the_goal():
    # the named pad is drawn after the layout: over seeds every pad index is named
    env = toy.make_env("reach", image_size=16)
    targets = set()
    for seed in range(30):
        env.reset(seed=seed)
        targets.add(env.unwrapped.target)
        assert env.unwrapped.pad_colors[env.unwrapped.target] in env.unwrapped.instruction
    assert targets == {0, 1, 2}
    env.close()


def test_unknown_task_and_bad_image_size():
    with pytest.raises(ValueError, match="reach"):
        toy.make_env("fly")
    with pytest.raises(ValueError, match="unknown task"):
        es.evaluate("expert", tasks=["fly"], episodes=1, out_dir="unused", progress=False)
    with pytest.raises(ValueError, match="image_size"):
        toy.make_env("reach", image_size=0)
    env = toy.make_env("reach", image_size=16)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(np.zeros(3))
    env.close()


def test_episode_round_trip_and_corrupt_files(tmp_path, damaged_copies):
    ep = es.collect_episode("push", toy.demo_seeds("push", 1)[0], image_size=16)
    path = tmp_path / "ep.npz"
    episodes.save_episode(path, ep)
    back = episodes.load_episode(path)
    assert set(back) == set(episodes.EPISODE_KEYS)
    for k in ("frames", "state", "action"):
        np.testing.assert_array_equal(back[k], ep[k])
        assert back[k].dtype == ep[k].dtype
    assert (back["instruction"], back["task"], back["seed"], back["success"]) == \
           (ep["instruction"], "push", 0, True)
    assert os.listdir(tmp_path) == ["ep.npz"]  # no temporary file left behind

    for damaged in damaged_copies(path):  # truncated.npz, garbage.npz
        with pytest.raises(ValueError, match=damaged.name):
            episodes.load_episode(damaged)
    no_action = tmp_path / "no_action.npz"
    np.savez_compressed(no_action, **{k: np.asarray(v) for k, v in ep.items() if k != "action"})
    with pytest.raises(ValueError, match="no_action.npz.*action"):
        episodes.load_episode(no_action)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        episodes.load_episode(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="T\\+1"):
        episodes.save_episode(tmp_path / "bad.npz", {**ep, "action": ep["action"][:-1]})


def test_wilson_interval_known_values():
    for (k, n), (lo, hi) in {(8, 10): (0.4902, 0.9433), (0, 10): (0.0, 0.2775), (10, 10): (0.7225, 1.0),
                             (50, 100): (0.4038, 0.5962)}.items():
        got = es.wilson_interval(k, n)
        assert got == pytest.approx((lo, hi), abs=1e-4), (k, n)
    with pytest.raises(ValueError):
        es.wilson_interval(3, 2)


def _check_report(report, out_dir, tasks, n):
    with open(os.path.join(out_dir, "report.json")) as f:
        on_disk = json.load(f)
    assert on_disk["overall"] == json.loads(json.dumps(report["overall"]))
    o = on_disk["overall"]
    assert o["n"] == n * len(tasks) and 0 <= o["ci95"][0] <= o["success_rate"] <= o["ci95"][1] <= 1
    assert set(on_disk["tasks"]) == set(tasks)
    for t in tasks:
        assert set(on_disk["tasks"][t]) >= {"success_rate", "ci95", "n"} and on_disk["tasks"][t]["n"] == n
    assert len(on_disk["episodes"]) == n * len(tasks)
    for e in on_disk["episodes"]:
        assert set(e) >= {"task", "seed", "instruction", "success", "steps", "error"}
        assert e["seed"] in suites.EVAL_SEEDS
    m = on_disk["manifest"]
    assert set(m) >= {"git_commit", "config", "packages", "seeds", "wall_seconds", "control_hz_achieved"}
    assert m["seeds"] == {t: toy.eval_seeds(t, n) for t in tasks}
    return on_disk


def test_evaluate_expert_report(tmp_path, monkeypatch):
    report = es.evaluate("expert", episodes=2, out_dir=str(tmp_path), gif_episodes=1, image_size=32, progress=False)
    r = _check_report(report, tmp_path, list(toy.TASKS), 2)
    assert r["overall"]["success_rate"] == 1.0
    assert r["manifest"]["config"]["policy"] == "scripted_expert"
    gifs = sorted(os.listdir(tmp_path / "gifs"))
    assert gifs == sorted(f"{t}_seed{suites.EVAL_SEEDS[0]}.gif" for t in toy.TASKS)

    # an environment error ends that episode as a failure with its error; the rest goes on
    step = toy.ToyTableEnv.step

    def broken_step(self, action):
        if self.episode_seed == suites.EVAL_SEEDS[1]:
            raise RuntimeError("simulated physics blow-up")
        return step(self, action)

    monkeypatch.setattr(toy.ToyTableEnv, "step", broken_step)
    report = es.evaluate("expert", tasks=["reach"], episodes=3, out_dir=str(tmp_path / "err"), gif_episodes=0,
                         image_size=16, progress=False)
    errors = [e["error"] for e in report["episodes"]]
    assert errors[0] is None and errors[2] is None and "simulated physics blow-up" in errors[1]
    assert [e["success"] for e in report["episodes"]] == [True, False, True]
    assert report["tasks"]["reach"]["successes"] == 2


def test_evaluate_from_a_later_seed(tmp_path):
    """first_episode=N evaluates the evaluation seeds N, N+1, ... of each task: the same episodes as
    the tail of a longer run from 0, and none of the first N."""
    later = es.evaluate("expert", tasks=["push"], episodes=2, first_episode=3, out_dir=str(tmp_path / "a"),
                        gif_episodes=0, image_size=16, progress=False)
    whole = es.evaluate("expert", tasks=["push"], episodes=5, out_dir=str(tmp_path / "b"), gif_episodes=0,
                        image_size=16, progress=False)
    assert later["manifest"]["seeds"]["push"] == toy.eval_seeds("push", 5)[3:]
    assert [e["seed"] for e in later["episodes"]] == [e["seed"] for e in whole["episodes"]][3:]
    assert [e["steps"] for e in later["episodes"]] == [e["steps"] for e in whole["episodes"]][3:]
    assert later["manifest"]["config"]["first_episode"] == 3
    with pytest.raises(ValueError, match="first_episode"):
        es.evaluate("expert", tasks=["push"], episodes=1, first_episode=-1, out_dir=str(tmp_path / "c"),
                    progress=False)


class StubModel(torch.nn.Module):
    """Stands in for DiT4DiT: checks its inputs, returns a known normalized chunk, counts calls."""

    def __init__(self, image_size=16, K=4):
        super().__init__()
        self.config = dataclasses.make_dataclass("Cfg", ["image_size", "action_horizon"])(image_size, K)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls, self.last_obs = 0, None

    def predict_action(self, obs, state, instruction, generator=None):
        self.calls += 1
        self.last_obs, self.last_state, self.last_text = obs, state, instruction
        B, K = obs.shape[0], self.config.action_horizon
        return torch.linspace(-1, 1, K)[None, :, None].repeat(B, 1, 2)  # (B, K, 2)


def test_model_policy_receding_horizon_and_conversions():
    model = StubModel(image_size=16, K=4)
    state_norm = Normalizer(low=[-1, -2], high=[1, 2])
    action_norm = Normalizer(low=[-0.5, -0.5], high=[0.5, 0.5])
    policy = es.ModelPolicy(model, state_norm, action_norm, execute_steps=3)
    env = toy.make_env("reach", image_size=16)
    results, _, steps = es.run_episodes([env], [suites.EVAL_SEEDS[0]], policy)
    obs, _ = env.reset(seed=suites.EVAL_SEEDS[0])
    env.close()
    assert results[0]["steps"] == steps
    assert model.calls == -(-steps // 3)  # one plan per 3 executed actions
    # the first plan saw the first observation: image (1, 3, H, W) in [-1, 1], normalized state, text
    first = es.ModelPolicy(StubModel(16, 4), state_norm, action_norm, execute_steps=3)
    first.reset([env])
    actions = [first.act([0], [obs])[0] for _ in range(3)]
    m = first.model
    assert m.calls == 1 and m.last_obs.shape == (1, 3, 16, 16)
    np.testing.assert_allclose(m.last_obs[0].permute(1, 2, 0).numpy(), obs["image"] / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(m.last_state[0].numpy(), obs["state"] / np.array([1, 2]), atol=1e-6)
    assert m.last_text == [env.unwrapped.instruction]
    # the executed prefix is the un-normalized chunk: linspace(-1, 1, 4) * 0.5
    np.testing.assert_allclose(np.stack(actions)[:, 0], np.linspace(-1, 1, 4)[:3] * 0.5, atol=1e-6)
    first.act([0], [obs])
    assert m.calls == 2  # the chunk prefix is used up: re-plan
    with pytest.raises(ValueError, match="execute_steps"):
        es.ModelPolicy(StubModel(16, 4), state_norm, action_norm, execute_steps=5)


def test_evaluate_tiny_dit4dit_and_load_policy(tmp_path):
    dit4dit = pytest.importorskip("dit4dit")
    torch.manual_seed(0)
    config = dit4dit.make_config("tiny", state_dim=toy.STATE_DIM, action_dim=toy.ACTION_DIM)
    model = dit4dit.DiT4DiT(config)
    state_norm = Normalizer(low=[-0.3, -0.5], high=[0.3, 0.5])
    action_norm = Normalizer(low=[-1, -1], high=[1, 1])
    ckpt = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(ckpt, model, state_norm, action_norm, step=7)
    policy = es.load_policy(str(ckpt), execute_steps=config.action_horizon)
    assert policy.checkpoint["step"] == 7 and len(policy.checkpoint["sha256"]) == 64
    for k, v in model.state_dict().items():
        torch.testing.assert_close(policy.model.state_dict()[k], v)
    out = tmp_path / "eval"
    report = es.evaluate(policy, tasks=["reach"], episodes=1, out_dir=str(out), gif_episodes=1, progress=False)
    r = _check_report(report, out, ["reach"], 1)
    assert r["manifest"]["config"]["image_size"] == config.image_size
    assert r["manifest"]["config"]["checkpoint"]["sha256"] == file_sha256(ckpt)
    assert all(e["error"] is None for e in r["episodes"])
    assert os.listdir(out / "gifs") == [f"reach_seed{suites.EVAL_SEEDS[0]}.gif"]
    with pytest.raises(ValueError, match="image_size"):
        es.evaluate(policy, episodes=1, out_dir=str(out), image_size=32, progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        es.load_policy(str(tmp_path / "nowhere.pt"))


def test_load_policy_action_noise_scale(tmp_path):
    """The sampler's starting-noise std comes from the checkpoint's config; load_policy (and
    --action-noise-scale) can replace it; a checkpoint written before the field existed loads with
    1, the scale it was trained and evaluated with."""
    dit4dit = pytest.importorskip("dit4dit")
    config = dit4dit.make_config("tiny", state_dim=toy.STATE_DIM, action_dim=toy.ACTION_DIM, action_noise_scale=0.0)
    norms = Normalizer(low=[-0.3, -0.5], high=[0.3, 0.5]), Normalizer(low=[-1, -1], high=[1, 1])
    ckpt = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(ckpt, dit4dit.DiT4DiT(config), *norms, step=1)
    assert es.load_policy(str(ckpt)).model.config.action_noise_scale == 0
    assert es.load_policy(str(ckpt), action_noise_scale=1).model.config.action_noise_scale == 1
    with pytest.raises(ValueError, match="action_noise_scale=-1"):
        es.load_policy(str(ckpt), action_noise_scale=-1.0)
    payload = torch.load(ckpt, weights_only=False)
    del payload["config"]["action_noise_scale"]
    payload["sha256"] = checkpoint.checkpoint_sha256(payload)
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    assert es.load_policy(str(old)).model.config.action_noise_scale == 1
    args = es.parse_args(["--ckpt", str(ckpt), "--action-noise-scale", "0.5", "--out", str(tmp_path)])
    assert args.action_noise_scale == 0.5


def test_cli_needs_exactly_one_policy(tmp_path):
    with pytest.raises(ValueError, match="--ckpt"):
        es.main(es.parse_args(["--out", str(tmp_path)]))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        es.main(es.parse_args(["--ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path)]))
    report = es.main(es.parse_args(["--expert", "--tasks", "reach", "--episodes", "1", "--gifs", "0",
                                    "--image-size", "16", "--out", str(tmp_path)]))
    assert report["tasks"]["reach"]["n"] == 1



def test_cli_errors_are_one_line_without_traceback(tmp_path, flipped_copy):
    dit4dit = pytest.importorskip("dit4dit")
    config = dit4dit.make_config("tiny", state_dim=toy.STATE_DIM, action_dim=toy.ACTION_DIM)
    model = dit4dit.DiT4DiT(config)
    ckpt = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(ckpt, model, Normalizer(-torch.ones(2), torch.ones(2)),
                            Normalizer(-torch.ones(2), torch.ones(2)), step=1)
    payload = torch.load(ckpt, weights_only=True)
    payload["state_normalizer"] = {"low": torch.zeros(7), "high": torch.ones(7)}
    payload["sha256"] = checkpoint.checkpoint_sha256(payload)
    torch.save(payload, tmp_path / "norm.pt")
    out = tmp_path / "out"
    cases = [
        (["--ckpt", str(tmp_path / "missing.pt")], "missing.pt does not exist"),
        (["--ckpt", str(tmp_path)], f"{tmp_path} is a directory"),
        (["--expert", "--tasks", "juggle"], "unknown task 'juggle'"),
        (["--ckpt", str(ckpt), "--tasks", "juggle"], "unknown task 'juggle'"),  # before the model is loaded
        (["--ckpt", str(flipped_copy(ckpt))], "flipped.pt is corrupt.*sha256"),
        (["--ckpt", str(tmp_path / "norm.pt")], "norm.pt: state_normalizer has 7 entries but config.state_dim=2"),
        (["--expert", "--episodes", "0"], "episodes must be an int >= 1"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            es.cli([*argv, "--out", str(out), "--gifs", "0"])
        text = str(exit_info.value.code)
        assert text.startswith("eval_sim.py: error: ") and "\n" not in text, text
        assert re.search(message, text), (message, text)
        assert not out.exists()  # refused before the output folder is made


def test_torch_compile_after_rendering_does_not_crash():
    # Importing eval_sim loads Triton before MuJoCo's EGL renderer; in the other order a
    # torch.compile (or the optimizer's first dynamo import) after a render segfaults. Run in a
    # fresh process, since this process has imported both already.
    import subprocess
    import sys

    code = ("import eval_sim, torch\n"
            "eval_sim.collect_episode('reach', 0, 32)\n"
            "f = torch.compile(lambda x: x * 2, backend='eager')\n"
            "assert f(torch.ones(2)).tolist() == [2.0, 2.0]\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])


def test_episodes_spread_over_worker_processes_give_the_same_report(tmp_path):
    """workers=2 runs the batches in two processes, each with its own envs and policy: the same
    episodes, in the same order, as one process."""
    kwargs = dict(tasks=["reach"], episodes=4, gif_episodes=1, batch_size=2, progress=False)
    one = es.evaluate("expert", out_dir=str(tmp_path / "one"), **kwargs)
    two = es.evaluate("expert", out_dir=str(tmp_path / "two"), workers=2, **kwargs)
    assert [{k: e[k] for k in ("seed", "success", "steps")} for e in one["episodes"]] == \
           [{k: e[k] for k in ("seed", "success", "steps")} for e in two["episodes"]]
    assert one["overall"] == two["overall"] and (tmp_path / "two" / one["episodes"][0]["gif"]).is_file()
    zero = es.evaluate("zero", out_dir=str(tmp_path / "zero"), **kwargs)
    assert zero["manifest"]["config"]["policy"] == "zero" and zero["overall"]["successes"] == 0


def test_policy_and_libero_flags_are_checked(tmp_path):
    for argv, message in [(["--policy", "zero", "--ckpt", "c.pt"], "give exactly one of"),
                          ([], "give exactly one of"),
                          (["--policy", "zero", "--libero-suite", "libero_goal"], "options of --suite libero"),
                          (["--policy", "zero", "--libero-render", "fast"], "options of --suite libero")]:
        with pytest.raises(ValueError, match=message):
            es.main(es.parse_args([*argv, "--out", str(tmp_path / "x")]))
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        es.evaluate("zero", tasks=["reach"], episodes=1, out_dir=str(tmp_path / "x"), workers=0, progress=False)
