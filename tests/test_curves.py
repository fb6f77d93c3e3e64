"""bench/curves.py: the grid of runs (resumable), the pooled points and their intervals, the report."""
import json

import pytest
from PIL import Image

import eval_sim
from bench import curves

TRAIN = ["--preset", "tiny", "--batch-size", "4", "--threads", "1", "--tasks", "reach", "--warmup", "0",
         "--log-every", "1", "--ckpt-every", "1"]


def test_pooled_point_and_table():
    rows = [{"variant": v, "demos_per_task": d, "seed": s, "step": t, "successes": k, "episodes": 10}
            for v, base in (("DiT4DiT", 3), ("action-only", 1))
            for d in (5, 10) for s in (0, 1) for t in (50, 100) for k in [base + s + (d == 10) + (t == 100)]]
    c = curves.curves(rows)
    assert c["last"] == 100 and c["most"] == 10
    (d5, p5), (d10, p10) = c["demos"]["DiT4DiT"]
    assert (d5, d10) == (5, 10)
    assert p10["successes"] == 5 + 6 and p10["episodes"] == 20 and p10["each"] == ["5/10", "6/10"]
    assert p10["ci95"] == pytest.approx(eval_sim.wilson_interval(11, 20))
    assert p10["mean"] == pytest.approx(0.55) and p10["std"] == pytest.approx(0.0707106, rel=1e-4)
    assert [(s, p["successes"]) for s, p in c["steps"]["action-only"]] == [(50, 1 + 2 + 2), (100, 2 + 3 + 2)]
    text = curves.table(c)
    assert "| vs demos | DiT4DiT | 10 | 100 | 11/20 = 55.0% |" in text
    assert "| vs steps | action-only | 10 | 50 | 5/20 = 25.0% |" in text


def test_grid_runs_resumes_and_reports(tmp_path):
    out = tmp_path / "grid"
    argv = ["--out", str(out), "--demos", "1", "2", "--seeds", "0", "--steps", "2", "--at", "1", "2",
            "--eval-episodes", "1", "--", *TRAIN]
    curves.main(argv)
    rows = curves.read_rows(out / "results.jsonl")
    keys = {(r["variant"], r["demos_per_task"], r["seed"], r["step"]) for r in rows}
    assert keys == {(v, d, 0, t) for v in curves.VARIANTS for d in (1, 2) for t in (1, 2)} and len(rows) == 8
    assert all(r["episodes"] == 1 and 0 <= r["successes"] <= 1 and set(r["per_task"]) == {"reach"} for r in rows)
    ckpt = out / "runs" / curves.run_name("action-only", 2, 0) / "checkpoint.pt"
    from bridges.checkpoint import load_checkpoint
    saved = load_checkpoint(str(ckpt))
    assert saved["step"] == 2 and saved["config"]["action_only"] and saved["args"]["demos_per_task"] == 2

    # the same command again trains and evaluates nothing; a lost row is evaluated again, alone
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    curves.main(argv)
    again = curves.read_rows(out / "results.jsonl")
    assert len(again) == 8 and again[-1]["step"] == rows[-1]["step"] and again[:7] == rows[:7]
    assert load_checkpoint(str(ckpt))["step"] == 2

    png = Image.open(out / "curves.png")
    assert png.size == (1000, 460) and len(png.getcolors(1 << 20)) > 3   # drawn, not blank
    assert (out / "curves.md").read_text().count("| vs ") == 2 * 2 + 2 * 2


def test_bad_grids_and_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--at: the last evaluation step must be --steps"):
        curves.main(["--out", str(tmp_path), "--steps", "10", "--at", "5"])
    with pytest.raises(ValueError, match="--demos"):
        curves.main(["--out", str(tmp_path), "--demos", "0"])
    (tmp_path / "results.jsonl").write_text('{"variant": "DiT4DiT"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        curves.main(["--out", str(tmp_path), "--report"])
    with pytest.raises(ValueError, match="no results"):
        curves.main(["--out", str(tmp_path / "empty"), "--report"])
