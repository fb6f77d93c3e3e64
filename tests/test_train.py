"""train_toy.py: dataset alignment, sampling, schedule, end-to-end smoke run, exact resume, torchrun."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import dit4dit
import train_toy
from bridges import checkpoint, episodes
from bridges.normalizer import Normalizer
from suites import toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dit4dit.make_config("tiny")


def fake_episode(steps, image_size, state_dim=3, action_dim=2, instruction="push the red block"):
    """An episode in bridges/episodes.py's format (T+1 frames and states, T actions) whose frame t is filled
    with the value t, state t = t and action t = (t, -t, ...), so alignment is readable."""
    t = np.arange(steps + 1)
    frames = np.broadcast_to(t[:, None, None, None], (steps + 1, image_size, image_size, 3)).astype(np.uint8)
    state = np.repeat(t[:, None], state_dim, axis=1).astype(np.float32)
    action = np.stack([t[:-1] * (1 if i % 2 == 0 else -1) for i in range(action_dim)], axis=1).astype(np.float32)
    return {"frames": frames.copy(), "state": state, "action": action, "instruction": instruction,
            "task": "push", "seed": 0, "success": True}


def make_dataset(episodes, F=2, K=4):
    states = np.concatenate([e["state"] for e in episodes])
    actions = np.concatenate([e["action"] for e in episodes])
    # add the hold action (zero) to the fitted range so the un-normalize below is exact for it
    actions = np.concatenate([actions, np.zeros_like(actions[:1])])
    return train_toy.EpisodeDataset(episodes, F, K, Normalizer.fit(states), Normalizer.fit(actions))


def test_sample_shapes_and_alignment():
    episodes = [fake_episode(10, 8), fake_episode(7, 8, instruction="reach the blue pad")]
    ds = make_dataset(episodes, F=2, K=4)  # stride s = 2
    assert len(ds) == 17 and ds.stride == 2
    for i, (ep, t) in enumerate([(0, t) for t in range(10)] + [(1, t) for t in range(7)]):
        length = len(episodes[ep]["action"])  # T actions, T+1 frames: frame T is the final observation
        sample = ds[i]
        assert sample["frames"].shape == (3, 8, 8, 3) and sample["frames"].dtype == torch.uint8
        # frame 0 is o_t, future frame j (0-based) is o_{t+(j+1)s}, the last frame repeated past the end
        expected = [min(t + j * 2, length) for j in range(3)]
        assert sample["frames"][:, 0, 0, 0].tolist() == expected
        assert sample["actions"].shape == (4, 2) and sample["state"].shape == (3,)
        np.testing.assert_allclose(np.asarray(ds.state_normalizer.unnormalize(sample["state"])), [t] * 3, atol=1e-4)
        raw = np.asarray(ds.action_normalizer.unnormalize(sample["actions"]))
        expected_a = [t + k if t + k < length else 0.0 for k in range(4)]  # hold (zero motion) past the end
        np.testing.assert_allclose(raw[:, 0], expected_a, atol=1e-4)
        np.testing.assert_allclose(raw[:, 1], [-a for a in expected_a], atol=1e-4)
        # the mask marks the real steps: padded ones past the end are not scored by the loss
        expected_mask = [[1.0, 1.0] if t + k < length else [0.0, 0.0] for k in range(4)]
        assert sample["action_mask"].tolist() == expected_mask
        assert sample["instruction"] == episodes[ep]["instruction"]
    batch = ds.batch(torch.tensor([0, 12, 16]))
    assert batch["video"].shape == (3, 3, 3, 8, 8) and batch["video"].dtype == torch.float32
    assert batch["video"].min() >= -1 and batch["video"].max() <= 1
    assert batch["actions"].shape == (3, 4, 2) and batch["state"].shape == (3, 3)
    # sample 16 is the last step (t = 6) of a 7-step episode: one real step, three padded
    assert batch["action_mask"].tolist()[2] == [[1.0, 1.0]] + [[0.0, 0.0]] * 3
    assert batch["actions"].abs().max() <= 1 + 1e-6 and batch["state"].abs().max() <= 1 + 1e-6
    assert batch["instruction"] == ["push the red block", "reach the blue pad", "reach the blue pad"]


def test_dataset_rejects_bad_horizon_and_shapes():
    with pytest.raises(ValueError, match="multiple of num_future_frames"):
        make_dataset([fake_episode(5, 8)], F=3, K=4)
    with pytest.raises(ValueError, match="episode 1"):
        make_dataset([fake_episode(5, 8), fake_episode(5, 6)])


def test_batches_are_task_balanced():
    """Two tasks with 3x more samples in one: each still gives half of what training draws (this
    failed while batches were drawn uniformly over samples)."""
    short = [dict(fake_episode(4, 8), task="reach") for _ in range(5)]   # 20 samples
    long = [dict(fake_episode(12, 8), task="push") for _ in range(5)]    # 60 samples
    ds = make_dataset(short + long)
    assert len(ds) == 80 and len(ds.balanced) == 120
    drawn = torch.cat([ds.balanced[train_toy.batch_indices(len(ds.balanced), 0, s, 0, 0, 1, 40, 1)] for s in range(30)])
    from_short = (drawn < 20).float().mean().item()
    assert 0.45 < from_short < 0.55
    assert set(ds.balanced.tolist()) == set(range(80))  # every sample is still drawn


def test_early_steps_are_drawn_more_often():
    """early_weight=4: the first K/2 = 2 steps of each episode appear 4 times in the table, the
    others once; tasks stay balanced."""
    eps = [dict(fake_episode(6, 8), task="reach"), dict(fake_episode(6, 8), task="push")]
    norms = [Normalizer.fit(np.concatenate([e[k] for e in eps])) for k in ("state", "action")]
    ds = train_toy.EpisodeDataset(eps, 2, 4, *norms, early_weight=4)
    counts = torch.bincount(ds.balanced, minlength=12).tolist()
    assert counts == [4, 4, 1, 1, 1, 1] * 2
    with pytest.raises(ValueError, match="early_weight"):
        train_toy.EpisodeDataset(eps, 2, 4, ds.state_normalizer, ds.action_normalizer, early_weight=0)


def test_batch_indices_shard_and_repeat():
    n, b = 37, 4
    a = train_toy.batch_indices(n, 0, 5, 0, 0, 2, b, 1)
    assert torch.equal(a, train_toy.batch_indices(n, 0, 5, 0, 0, 2, b, 1))  # a function of its arguments
    other_rank = train_toy.batch_indices(n, 0, 5, 0, 1, 2, b, 1)
    assert not set(a.tolist()) & set(other_rank.tolist())                    # ranks see disjoint samples
    # two processes x one micro-step = one process x two micro-steps
    assert torch.equal(other_rank, train_toy.batch_indices(n, 0, 5, 1, 0, 1, b, 2))
    # one epoch visits every sample once
    stream = torch.cat([train_toy.batch_indices(30, 1, s, 0, 0, 1, 5, 1) for s in range(6)])
    assert sorted(stream.tolist()) == list(range(30))
    assert not torch.equal(stream, torch.cat([train_toy.batch_indices(30, 2, s, 0, 0, 1, 5, 1) for s in range(6)]))


def test_lr_schedule_warmup_then_cosine_to_five_percent():
    f = [train_toy.lr_factor(s, 10, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(f[10:], f[11:]))
    assert train_toy.lr_factor(100, 10, 100) == pytest.approx(0.05)


def test_param_groups_split_video_and_action():
    model = dit4dit.DiT4DiT(TINY)
    groups = train_toy.param_groups(model, 1e-5, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sum(len(g["params"]) for g in groups) == len(names)
    for g in groups:
        for p in g["params"]:
            assert names[id(p)].startswith(train_toy.ACTION_PREFIXES) == (g["name"] == "action")
            assert g["lr"] == (1e-4 if g["name"] == "action" else 1e-5)
    assert {g["name"] for g in groups} == {"video", "action"}


def test_loss_curve_png(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s, "video_loss": 0.6 / s, "action_loss": 0.4 / s} for s in range(1, 50)]
    path = str(tmp_path / "loss.png")
    train_toy.draw_loss_curve(rows, path)
    from PIL import Image
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (520, 900, 3)
    assert (np.abs(image.astype(int) - [40, 90, 220]).sum(-1) == 0).sum() > 100   # the video_loss curve
    assert (np.abs(image.astype(int) - [220, 60, 40]).sum(-1) == 0).sum() > 100   # the action_loss curve


# ---------------------------------------------------------------------------------------------- runs

def run_args(out, *extra):
    return train_toy.build_parser().parse_args(
        ["--preset", "tiny", "--batch-size", "4", "--threads", "1", "--log-every", "1", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A few synthetic episodes in the on-disk format, at the tiny preset's image size."""
    root = tmp_path_factory.mktemp("episodes")
    rng = np.random.default_rng(0)
    for i in range(3):
        ep = fake_episode(12, TINY.image_size, state_dim=TINY.state_dim, action_dim=TINY.action_dim)
        ep["frames"] = rng.integers(0, 256, ep["frames"].shape, dtype=np.uint8)
        ep["action"] = rng.uniform(-1, 1, ep["action"].shape).astype(np.float32)
        episodes.save_episode(str(root / f"ep_{i}.npz"), ep)
    return root


def test_smoke_train_then_evaluate(tmp_path):
    task = sorted(toy.TASKS)[0]
    report = train_toy.main(run_args(tmp_path / "run", "--steps", "3", "--demos-per-task", "2", "--tasks", task,
                                     "--eval-episodes", "1", "--demo-cache", str(tmp_path / "demos")))
    run = tmp_path / "run"
    for name in ("checkpoint.pt", "loss.png", "report.json", "train_log.jsonl"):
        assert (run / name).is_file(), name
    assert list((tmp_path / "demos").glob("*/*.npz"))          # demos cached on disk
    on_disk = json.loads((run / "report.json").read_text())
    assert 0.0 <= on_disk["overall"]["success_rate"] <= 1.0
    assert on_disk["training"]["steps"] == 3 and report["overall"] == on_disk["overall"]
    ckpt = checkpoint.load_checkpoint(str(run / "checkpoint.pt"))
    for key in ("model", "config", "state_normalizer", "action_normalizer", "step",
                "optimizer", "scheduler", "args"):
        assert key in ckpt, key
    assert ckpt["step"] == 3 and ckpt["config"]["image_size"] == TINY.image_size
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)


def test_weight_average_schedule_and_swap():
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    average = train_toy.WeightAverage(layer, decay=0.95)
    with torch.no_grad():
        layer.weight.fill_(3.0)
    average.update(layer, step=0)  # rate 1 - min(0.95, 1/10) = 0.9: 1 + 0.9 * (3 - 1)
    torch.testing.assert_close(average.params[0], torch.full((1, 2), 2.8))
    for step in range(1, 200):  # the warm-up ends where (1 + n) / (10 + n) reaches the decay (n = 161)
        average.update(layer, step)
    gap = 3.0 - average.params[0]
    average.update(layer, 200)  # now the rate is 1 - 0.95
    torch.testing.assert_close(3.0 - average.params[0], gap * 0.95)
    with average.applied(layer):
        assert torch.equal(layer.weight, average.params[0])
    assert torch.equal(layer.weight, torch.full((1, 2), 3.0))  # the optimizer's weights are back


def test_no_weight_average_saves_the_optimizers_weights(tmp_path, data_dir):
    train_toy.main(run_args(tmp_path / "run", *common_args(data_dir, steps=2), "--ema-decay", "0"))
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert "training_weights" not in ckpt and ckpt["args"]["ema_decay"] == 0


def common_args(data_dir, steps=4):
    return ["--data", str(data_dir), "--steps", str(steps), "--eval-episodes", "0", "--warmup", "1"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_dir):
    """An uninterrupted 4-step run on data_dir: what every resumed run must end with."""
    out = tmp_path_factory.mktemp("full")
    train_toy.main(run_args(out / "run", *common_args(data_dir)))
    return out / "run"


def test_resume_equals_uninterrupted_run(tmp_path, data_dir, full_run):
    common = common_args(data_dir)
    train_toy.main(run_args(tmp_path / "cut", *common, "--stop-after", "2"))
    assert checkpoint.load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))["step"] == 2
    at_step_2 = checkpoint.load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))["model"]
    train_toy.main(train_toy.build_parser().parse_args(
        [*common, "--resume", str(tmp_path / "cut" / "checkpoint.pt"), "--batch-size", "4", "--threads", "1",
         "--log-every", "1", "--preset", "tiny"]))
    full = checkpoint.load_checkpoint(str(full_run / "checkpoint.pt"))
    resumed = checkpoint.load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))
    assert resumed["step"] == full["step"] == 4
    for key in ("model", "training_weights"):  # the weight average and the optimizer's weights
        for name, value in full[key].items():
            assert torch.equal(value, resumed[key][name]), (key, name)
    # steps 3 and 4 changed the parameters, so the equality above is not trivial
    assert any(not torch.equal(v, at_step_2[k]) for k, v in full["model"].items())
    # and "model" is the average, not the optimizer's weights
    assert any(not torch.equal(v, full["training_weights"][k]) for k, v in full["model"].items())
    log = [json.loads(line)["step"] for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]


def resume_args(ckpt, *extra):
    return train_toy.build_parser().parse_args(
        ["--preset", "tiny", "--batch-size", "4", "--threads", "1", "--log-every", "1", "--resume", str(ckpt), *extra])


def test_resume_refuses_a_changed_experiment_in_one_line(tmp_path, data_dir):
    common = common_args(data_dir)
    train_toy.main(run_args(tmp_path / "cut", *common, "--stop-after", "2"))
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    before = ckpt.read_bytes()
    changes = [(["--steps", "6"], "--steps 4 -> 6"), (["--seed", "1"], "--seed 0 -> 1"),
               (["--batch-size", "2"], "--batch-size 4 -> 2"), (["--grad-accum", "2"], "--grad-accum 1 -> 2"),
               (["--lr-video", "1e-3"], "--lr-video 0.0003 -> 0.001"), (["--warmup", "2"], "--warmup 1 -> 2"),
               (["--repeat", "3"], "config.repeat 2 -> 3"), (["--action-only"], "config.action_only False -> True")]
    for flags, message in changes:
        argv = [*common, *flags] if flags[0] not in common else \
            [*common[:common.index(flags[0])], *flags, *common[common.index(flags[0]) + 2:]]
        with pytest.raises(ValueError, match=f"--resume .*would change the experiment.*{message}.*--allow-changes") as e:
            train_toy.main(resume_args(ckpt, *argv))
        assert "\n" not in str(e.value)
    other = tmp_path / "other"
    other.mkdir()
    for name in os.listdir(data_dir)[:2]:  # fewer episodes: other data
        (other / name).write_bytes((data_dir / name).read_bytes())
    with pytest.raises(ValueError, match="would change the experiment.*data '3 episodes.* -> '2 episodes"):
        train_toy.main(resume_args(ckpt, *[a if a != str(data_dir) else str(other) for a in common]))
    assert ckpt.read_bytes() == before  # refused runs wrote nothing


def test_allow_changes_continues_with_the_new_values_and_logs_them(tmp_path, data_dir):
    train_toy.main(run_args(tmp_path / "cut", *common_args(data_dir), "--stop-after", "2"))
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    train_toy.main(resume_args(ckpt, *common_args(data_dir, steps=6), "--allow-changes"))
    after = checkpoint.load_checkpoint(str(ckpt))
    assert after["step"] == 6 and after["experiment"]["--steps"] == 6
    assert after["changes"] == [{"step": 2, "changes": ["--steps 4 -> 6"]}]
    rows = [json.loads(line) for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    events = [r for r in rows if "event" in r]
    assert events == [{"step": 2, "event": "resume --allow-changes", "checkpoint": str(ckpt),
                       "changes": ["--steps 4 -> 6"]}]
    by_step = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(by_step) == [1, 2, 3, 4, 5, 6]
    # step 3 ran on the new schedule (warm-up 1, cosine over 6 steps), not the old one (over 4)
    assert by_step[3]["lr_action"] == pytest.approx(train_toy.LR_ACTION * train_toy.lr_factor(2, 1, 6))


def test_resume_with_another_image_size_is_refused_or_applied(tmp_path):
    demo = ["--tasks", "reach", "--demos-per-task", "2", "--demo-cache", str(tmp_path / "demos"), "--steps", "2"]
    train_toy.main(run_args(tmp_path / "base", *demo, "--stop-after", "1", "--eval-episodes", "0"))
    ckpt = tmp_path / "base" / "checkpoint.pt"
    with pytest.raises(ValueError, match="config.image_size 16 -> 32"):
        train_toy.main(resume_args(ckpt, *demo, "--image-size", "32", "--eval-episodes", "1",
                                   "--out", str(tmp_path / "run")))
    assert not (tmp_path / "run").exists() and not os.path.exists(train_toy.demo_cache_dir(tmp_path / "demos", "reach", 32))
    # allowed: the model is trained, saved and evaluated at the new size, and the log says so
    report = train_toy.main(resume_args(ckpt, *demo, "--image-size", "32", "--eval-episodes", "1",
                                        "--out", str(tmp_path / "run"), "--allow-changes"))
    saved = checkpoint.load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert saved["config"]["image_size"] == 32 and saved["step"] == 2
    assert report["manifest"]["config"]["image_size"] == 32
    log = (tmp_path / "run" / "train_log.jsonl").read_text()
    assert "config.image_size 16 -> 32" in log


def test_resume_of_a_finished_run_says_so(tmp_path, data_dir, full_run):
    with pytest.raises(ValueError, match="already trained 4 of --steps 4.*eval_sim.py --ckpt"):
        train_toy.main(resume_args(full_run / "checkpoint.pt", *common_args(data_dir),
                                   "--out", str(tmp_path / "new")))
    assert not (tmp_path / "new").exists()


def test_resume_needs_a_training_checkpoint(tmp_path, data_dir):
    model = dit4dit.DiT4DiT(TINY)
    ckpt = tmp_path / "model_only.pt"
    norm = Normalizer(-torch.ones(3), torch.ones(3))
    checkpoint.save_checkpoint(ckpt, model, norm, Normalizer(-torch.ones(2), torch.ones(2)))
    with pytest.raises(ValueError, match="model_only.pt.*optimizer"):
        train_toy.main(resume_args(ckpt, *common_args(data_dir), "--out", str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_one_run_per_folder(tmp_path, data_dir):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / train_toy.RUN_LOCK
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{sleeper.pid} {train_toy.socket.gethostname()}\n")
        with pytest.raises(FileExistsError, match=f"another run \\(pid {sleeper.pid}.*is writing into"):
            train_toy.main(run_args(out, *common_args(data_dir)))
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone (kill -9): its lock and its half-written temporary files are cleaned up
    (out / f".checkpoint.pt.tmp{sleeper.pid}").write_bytes(b"half a checkpoint")
    train_toy.main(run_args(out, *common_args(data_dir, steps=2)))
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "loss.png", "train_log.jsonl"]
    # a new run into a folder that holds a run: refused, unless --overwrite
    with pytest.raises(FileExistsError, match="already holds a run.*--resume .*--overwrite"):
        train_toy.main(run_args(out, *common_args(data_dir, steps=3)))
    train_toy.main(run_args(out, *common_args(data_dir, steps=3), "--overwrite"))
    assert checkpoint.load_checkpoint(str(out / "checkpoint.pt"))["step"] == 3
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_kill_9_leaves_a_loadable_checkpoint_and_an_exact_resume(tmp_path, data_dir, full_run):
    out = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(ROOT, "train_toy.py"), "--preset", "tiny", "--batch-size", "4", "--threads",
           "1", "--log-every", "1", "--ckpt-every", "1", *common_args(data_dir), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill while the second checkpoint is being written (its temporary file exists)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        names = os.listdir(out) if out.exists() else []
        if "checkpoint.pt" in names and any(n.startswith(".checkpoint.pt.tmp") for n in names):
            break
    proc.kill()
    proc.wait()
    ckpt = checkpoint.load_checkpoint(str(out / "checkpoint.pt"))  # verified: complete and unchanged
    if ckpt["step"] < 4:
        train_toy.main(resume_args(out / "checkpoint.pt", *common_args(data_dir)))
    full = checkpoint.load_checkpoint(str(full_run / "checkpoint.pt"))
    resumed = checkpoint.load_checkpoint(str(out / "checkpoint.pt"))
    assert resumed["step"] == 4
    for name, value in full["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    assert not [n for n in os.listdir(out) if ".tmp" in n or n == train_toy.RUN_LOCK]


def test_torchrun_two_processes_match_gradient_accumulation(tmp_path, data_dir):
    common = ["--preset", "tiny", "--data", str(data_dir), "--steps", "2", "--eval-episodes", "0",
              "--batch-size", "2", "--threads", "1", "--warmup", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(ROOT, "train_toy.py"), *common, "--out", str(tmp_path / "ddp")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = checkpoint.load_checkpoint(str(tmp_path / "ddp" / "checkpoint.pt"))
    assert ddp["step"] == 2
    # the same global batch on one process with two micro-steps gives the same parameters
    train_toy.main(train_toy.build_parser().parse_args([*common, "--grad-accum", "2", "--out", str(tmp_path / "one")]))
    one = checkpoint.load_checkpoint(str(tmp_path / "one" / "checkpoint.pt"))
    for name, value in one["model"].items():
        torch.testing.assert_close(ddp["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_bad_flags_and_data_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="--steps"):
        train_toy.main(run_args(tmp_path, "--steps", "0"))
    with pytest.raises(ValueError, match="--preset.*'huge'"):
        train_toy.main(run_args(tmp_path, "--preset", "huge"))
    with pytest.raises(ValueError, match="--tasks.*'juggle'"):
        train_toy.main(run_args(tmp_path, "--tasks", "juggle"))
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train_toy.main(run_args(tmp_path, "--data", missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no episode files"):
        train_toy.main(run_args(tmp_path, "--data", str(empty)))
    with pytest.raises(ValueError, match="--action-only.*--detach-features"):
        train_toy.main(run_args(tmp_path, "--action-only", "--detach-features"))
    with pytest.raises(FileNotFoundError, match="--resume"):
        train_toy.main(run_args(tmp_path, "--resume", str(tmp_path / "none.pt")))
    with pytest.raises(IsADirectoryError, match="is a directory"):
        train_toy.main(run_args(tmp_path, "--resume", str(tmp_path)))
    for flags, message in [(["--threads", "0"], "--threads"), (["--warmup", "-1"], "--warmup"),
                           (["--ema-decay", "1"], "--ema-decay"), (["--ema-decay", "-0.1"], "--ema-decay"),
                           (["--demo-noise", "-1"], "--demo-noise"), (["--demo-noise", "nan"], "--demo-noise"),
                           (["--resume", "x.pt", "--overwrite"], "--overwrite")]:
        with pytest.raises(ValueError, match=message):
            train_toy.main(run_args(tmp_path, *flags))


def test_flags_are_checked_before_any_work(tmp_path):
    cache, out = tmp_path / "demos", tmp_path / "run"
    for flags, message in [(["--image-size", "17"], "image_size=17 is not a multiple of patch_size=4"),
                           (["--extract-layer", "5"], "extract_layer=5 is out of range"),
                           (["--image-size", "0"], "--image-size")]:
        with pytest.raises(ValueError, match=message):
            train_toy.main(run_args(out, "--demo-cache", str(cache), "--demos-per-task", "2", *flags))
        assert not cache.exists() and not out.exists()


def test_image_size_must_match_the_data(tmp_path, data_dir):
    with pytest.raises(ValueError, match="--image-size 32.*16px"):
        train_toy.main(run_args(tmp_path / "run", "--data", str(data_dir), "--image-size", "32"))


def test_episodes_that_do_not_match_name_the_file(tmp_path, data_dir):
    for name, change in [("wide.npz", lambda ep: {**ep, "action": np.zeros((12, 3), np.float32)}),
                         ("state.npz", lambda ep: {**ep, "state": np.zeros((13, 5), np.float32)}),
                         ("x_big.npz", lambda ep: {**ep, "frames": np.zeros((13, 32, 32, 3), np.uint8)})]:
        mixed = tmp_path / name.split(".")[0]
        mixed.mkdir()
        for good in os.listdir(data_dir):
            (mixed / good).write_bytes((data_dir / good).read_bytes())
        episodes.save_episode(str(mixed / name), change(episodes.load_episode(str(data_dir / "ep_0.npz"))))
        with pytest.raises(ValueError, match=f"episode file {mixed / name}: .*but .*ep_0.npz"):
            train_toy.main(run_args(tmp_path / "run", "--data", str(mixed)))
        assert not (tmp_path / "run").exists()


def test_corrupt_episode_names_the_file(tmp_path, data_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    good = open(os.path.join(data_dir, "ep_0.npz"), "rb").read()
    (bad / "ep_0.npz").write_bytes(good)
    (bad / "ep_1.npz").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match="ep_1.npz"):
        train_toy.main(run_args(tmp_path / "run", "--data", str(bad), "--steps", "1", "--eval-episodes", "0"))


def test_cli_reports_bad_flag_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_toy.cli(["--steps", "0", "--out", str(tmp_path)])
    assert "--steps must be >= 1" in str(exit_info.value.code)
    with pytest.raises(SystemExit):
        train_toy.cli(["--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_collect_demos_every_pad(tmp_path):
    """every_pad: each demo layout toward each pad (reach: 3 pads), cached under its own name;
    without it, one episode per layout."""
    eps = train_toy.collect_demos(["reach"], 2, 16, str(tmp_path), progress=False, every_pad=True)
    assert len(eps) == 6 and len({(e["seed"], e["instruction"]) for e in eps}) == 6
    assert sorted(os.listdir(train_toy.demo_cache_dir(tmp_path, "reach", 16))) == [f"seed_00000{s}_pad{p}.npz" for s in (0, 1) for p in range(3)]
    clean = train_toy.collect_demos(["reach"], 2, 16, str(tmp_path), progress=False, every_pad=False)
    assert len(clean) == 2
    # demos collected with noise on the executed commands live in their own cache folder
    noisy = train_toy.collect_demos(["reach"], 2, 16, str(tmp_path), progress=False, every_pad=False, noise=0.3)
    assert os.path.basename(os.path.dirname(noisy[0]["path"])).endswith("_noise0.3")
    assert noisy[0]["seed"] == clean[0]["seed"] and not np.array_equal(noisy[0]["state"], clean[0]["state"])


# ---------------------------------------------------------------------------------------------- LeRobot

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "lerobot")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The toy demos of two layouts per task, collected into a cache and exported as LeRobot v3.0."""
    root = tmp_path_factory.mktemp("export")
    args = run_args(root / "unused", "--export-dataset", str(root / "toy_lerobot"), "--demos-per-task", "2",
                    "--demo-cache", str(root / "demos"))
    assert train_toy.main(args) is None and not (root / "unused").exists()  # exported, nothing trained
    demos = train_toy.collect_demos(sorted(toy.TASKS), 2, TINY.image_size, str(root / "demos"), progress=False,
                                    noise=train_toy.DEMO_NOISE)
    return root, demos


def test_export_dataset_round_trips_the_toy_demos(exported):
    from bridges.lerobot import LeRobotEpisodes

    root, demos = exported
    read = LeRobotEpisodes(str(root / "toy_lerobot")).episodes()
    assert len(read) == len(demos) and read[0]["fps"] == round(1 / toy.CONTROL_DT)
    by_key = {(ep["instruction"], ep["action"].tobytes()): ep for ep in read}
    for demo in demos:
        ep = by_key[(demo["instruction"], demo["action"].tobytes())]  # actions exact
        T = len(demo["action"])
        np.testing.assert_array_equal(ep["state"], demo["state"][:T])  # states exact (no final state)
        assert ep["frames"].shape == demo["frames"][:T].shape
        error = np.abs(ep["frames"].astype(float) - demo["frames"][:T])  # AV1, yuv420p: chroma at 8x8
        colour = np.abs(ep["frames"].mean((1, 2)) - demo["frames"][:T].mean((1, 2)))  # (T, 3) per frame
        assert error.mean() < 10 and colour.max() < 4, (error.mean(), colour.max())


def test_training_on_the_exported_dataset_matches_the_in_memory_demos(exported, tmp_path):
    """Same seed, same samples, same normalized actions: the action loss agrees step for step (to
    the drift the slightly different frames cause through the shared video DiT), the video loss
    within the AV1 codec's noise on the frames (~3/255 per pixel)."""
    root, _ = exported
    runs = {}
    for name, flags in (("demos", ["--demos-per-task", "2", "--demo-cache", str(root / "demos")]),
                        ("lerobot", ["--dataset", str(root / "toy_lerobot"), "--suite", "toy"])):
        train_toy.main(run_args(tmp_path / name, "--steps", "4", "--eval-episodes", "0", *flags))
        runs[name] = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
    for a, b in zip(runs["demos"], runs["lerobot"], strict=True):
        assert abs(a["action_loss"] - b["action_loss"]) <= 1e-3 * a["action_loss"], (a, b)
        assert abs(a["video_loss"] - b["video_loss"]) <= 0.02, (a, b)
    assert runs["demos"][0]["action_loss"] == runs["lerobot"][0]["action_loss"]  # before any update: exact


def test_training_on_the_libero_shaped_fixture_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    train_toy.main(run_args(out, "--dataset", os.path.join(FIXTURES, "libero_like"), "--steps", "2",
                            "--cameras", "observation.images.image", "observation.images.wrist_image"))
    ckpt = checkpoint.load_checkpoint(str(out / "checkpoint.pt"))
    assert (ckpt["config"]["state_dim"], ckpt["config"]["action_dim"]) == (8, 7)  # from its features
    assert not (out / "report.json").exists()  # no simulator named: no evaluation
    stats = json.load(open(os.path.join(FIXTURES, "libero_like", "meta", "stats.json")))
    np.testing.assert_allclose(ckpt["action_normalizer"]["low"].numpy(), stats["action"]["min"], rtol=1e-6)


def test_dataset_flags_give_clear_errors(tmp_path, capsys):
    fixture = os.path.join(FIXTURES, "libero_like")
    for flags, error, message in [
            (["--inspect"], ValueError, "--inspect describes a LeRobot dataset"),
            (["--cameras", "x"], ValueError, "--cameras chooses"),
            (["--dataset", fixture, "--data", str(tmp_path)], ValueError, "--data and --dataset"),
            (["--dataset", str(tmp_path)], FileNotFoundError, "not a LeRobot dataset"),
            (["--dataset", fixture, "--tasks", "push"], ValueError, "give --suite too"),
            (["--export-dataset", str(tmp_path / "x"), "--resume", "c.pt"], ValueError, "--export-dataset")]:
        with pytest.raises(error, match=message):
            train_toy.main(run_args(tmp_path / "run", *flags))
    assert not (tmp_path / "run").exists()
    train_toy.main(run_args(tmp_path / "run", "--dataset", fixture, "--inspect"))
    shown = capsys.readouterr().out
    assert "3 episodes, 89 frames" in shown and "put the black bowl on the plate" in shown
    assert not (tmp_path / "run").exists()
