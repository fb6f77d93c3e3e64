"""The paper's sample-efficiency claim as curves: closed-loop success against demos per task and
against training steps, DiT4DiT beside the action-only ablation, over several training seeds.

    python -m bench.curves --out runs/curves/toy --demos 25 100 500 --seeds 0 1 2 --steps 4000 \
        --at 1000 2000 4000
    python -m bench.curves --out runs/curves/mw --suite metaworld --tasks reach-v3 push-v3 --demos 5 10 25 \
        --steps 1500 --at 500 1500 --eval-episodes 20
    python -m bench.curves --out runs/curves/toy --report      # the PNG and the table, nothing trained

A run is one (variant, demos per task, training seed): train_toy.py in this process with the flags
given after `--` (the same for every run), its schedule set by --steps and cut with --stop-after
at each step of --at. After each slice the checkpoint (its weight average, as train_toy.py saves
it) is evaluated on the first --eval-episodes evaluation seeds of each task and one row is
appended to <out>/results.jsonl. Rows already there are not run again: an interrupted grid goes on
where it stopped when the same command is given again.

The report (<out>/curves.png, <out>/curves.md): success against demos per task at the last step of
--at, and against the step for the runs with the most demos. A point pools its seeds (successes
over all their episodes, with a 95 % Wilson interval); the table also gives the mean and standard
deviation over seeds, and each run's own figure.
"""
import argparse
import json
import os
import statistics
import sys

from PIL import Image, ImageDraw, ImageFont

VARIANTS = {"DiT4DiT": [], "action-only": ["--action-only"]}   # name -> train_toy.py flags
COLOURS = {"DiT4DiT": (40, 90, 220), "action-only": (220, 110, 30)}


def run_name(variant, demos, seed):
    return f"{'dit4dit' if variant == 'DiT4DiT' else 'action_only'}_demos{demos}_seed{seed}"


def read_rows(path):
    """The rows of results.jsonl (a missing file: none). A line that is not JSON raises, naming it."""
    from bridges.files import read_jsonl

    return read_jsonl(path) if os.path.exists(path) else []


def append_row(path, row):
    """One row, appended and flushed to disk: a crash loses at most the row being written."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def train_to(train_args, folder, step, total_steps):
    """Train the run in `folder` up to `step` of a `total_steps` schedule: a new run, or the
    checkpoint there resumed. Returns the checkpoint's path."""
    import train_toy
    from bridges.checkpoint import load_checkpoint

    ckpt = os.path.join(folder, "checkpoint.pt")
    done = int(load_checkpoint(ckpt)["step"]) if os.path.exists(ckpt) else 0
    if done > step:
        raise ValueError(f"{ckpt} is at step {done}, past {step}: its evaluation at step {step} cannot be made "
                         f"again (remove the folder to rerun it)")
    if done < step:
        argv = [*train_args, "--steps", str(total_steps), "--stop-after", str(step - done), "--eval-episodes", "0"]
        argv += ["--resume", ckpt] if done else ["--out", folder]
        train_toy.main(train_toy.build_parser().parse_args(argv))
    return ckpt


def evaluate_checkpoint(ckpt, train_args, episodes, out_dir):
    """(successes per task, episodes per task) of the checkpoint on the first `episodes` evaluation
    seeds of each task of the run's suite."""
    import eval_sim
    import train_toy

    args = train_toy.build_parser().parse_args(train_args)
    train_toy.validate_args(args)   # fills in the suite's tasks
    report = eval_sim.evaluate(eval_sim.load_policy(ckpt), tasks=args.tasks, episodes=episodes, out_dir=out_dir,
                               gif_episodes=0, suite=args.suite, progress=False, **train_toy.eval_options(args))
    return {task: t["successes"] for task, t in report["tasks"].items()}, episodes


def run_grid(args, train_args):
    """Every (variant, demos, seed, step) of the grid not yet in results.jsonl: trained, evaluated, appended."""
    os.makedirs(args.out, exist_ok=True)
    results = os.path.join(args.out, "results.jsonl")
    done = {(r["variant"], r["demos_per_task"], r["seed"], r["step"]) for r in read_rows(results)}
    common = [*train_args, "--demo-cache", args.demo_cache or os.path.join(args.out, "demos")]
    for demos in args.demos:
        for seed in args.seeds:
            for variant in args.variants:
                folder = os.path.join(args.out, "runs", run_name(variant, demos, seed))
                run_args = [*common, *VARIANTS[variant], "--demos-per-task", str(demos), "--seed", str(seed)]
                for step in sorted(args.at):
                    if (variant, demos, seed, step) in done:
                        continue
                    ckpt = train_to(run_args, folder, step, args.steps)
                    per_task, episodes = evaluate_checkpoint(ckpt, run_args, args.eval_episodes,
                                                             os.path.join(folder, f"eval_step{step}"))
                    row = {"variant": variant, "demos_per_task": demos, "seed": seed, "step": step,
                           "steps": args.steps, "successes": sum(per_task.values()),
                           "episodes": episodes * len(per_task), "per_task": per_task, "train_args": train_args}
                    append_row(results, row)
                    print(f"{variant:12s} demos {demos:4d} seed {seed} step {step:6d}: "
                          f"{row['successes']}/{row['episodes']}", flush=True)


# ----------------------------------------------------------------------------------------------
# The report

def pooled(rows):
    """A point from the rows of its seeds: dict(successes, episodes, rate, ci95, seeds, mean, std)."""
    from eval_sim import wilson_interval

    successes, episodes = sum(r["successes"] for r in rows), sum(r["episodes"] for r in rows)
    rates = [r["successes"] / r["episodes"] for r in rows]
    return {"successes": successes, "episodes": episodes, "rate": successes / episodes,
            "ci95": wilson_interval(successes, episodes), "seeds": sorted(r["seed"] for r in rows),
            "mean": statistics.mean(rates), "std": statistics.stdev(rates) if len(rates) > 1 else 0.0,
            "each": [f"{r['successes']}/{r['episodes']}" for r in sorted(rows, key=lambda r: r["seed"])]}


def curves(rows):
    """{"demos": {variant: [(demos, point)]}, "steps": {variant: [(step, point)]}, "last", "most"}: the
    demos curve at the last step evaluated, the steps curve at the most demos."""
    if not rows:
        raise ValueError("no results to report: run the grid first")
    last, most = max(r["step"] for r in rows), max(r["demos_per_task"] for r in rows)
    out = {"demos": {}, "steps": {}, "last": last, "most": most}
    for variant in sorted({r["variant"] for r in rows}, key=list(VARIANTS).index):
        mine = [r for r in rows if r["variant"] == variant]
        out["demos"][variant] = [(d, pooled([r for r in mine if r["demos_per_task"] == d and r["step"] == last]))
                                 for d in sorted({r["demos_per_task"] for r in mine if r["step"] == last})]
        out["steps"][variant] = [(s, pooled([r for r in mine if r["demos_per_task"] == most and r["step"] == s]))
                                 for s in sorted({r["step"] for r in mine if r["demos_per_task"] == most})]
    return out


def table(c):
    """The curves as a markdown table."""
    lines = ["| curve | variant | demos per task | step | success (pooled) | 95 % Wilson CI | mean ± std over seeds "
             "| each seed |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for curve, key in (("demos", "demos"), ("steps", "steps")):
        for variant, points in c[key].items():
            for x, p in points:
                demos, step = (x, c["last"]) if key == "demos" else (c["most"], x)
                lines.append(f"| vs {curve} | {variant} | {demos} | {step} | {p['successes']}/{p['episodes']} = "
                             f"{p['rate']:.1%} | {p['ci95'][0]:.1%}–{p['ci95'][1]:.1%} | {p['mean']:.1%} ± "
                             f"{p['std']:.1%} (seeds {', '.join(map(str, p['seeds']))}) | {', '.join(p['each'])} |")
    return "\n".join(lines) + "\n"


def draw_panel(draw, font, box, title, xlabel, series):
    """One panel: x positions evenly spaced by rank (labelled with their values), y success 0-100 %,
    each variant a line through its pooled points with their Wilson intervals as bars."""
    left, top, right, bottom = box
    xs = sorted({x for points in series.values() for x, _ in points})
    draw.text((left, top - 22), title, fill="black", font=font)
    draw.rectangle([left, top, right, bottom], outline="black")
    for k in range(6):
        y = bottom - k / 5 * (bottom - top)
        draw.line([left, y, right, y], fill=(225, 225, 225))
        draw.text((left - 34, y - 6), f"{20 * k}%", fill="black", font=font)

    def px(x, rate):
        i = xs.index(x)
        u = 0.5 if len(xs) == 1 else 0.08 + 0.84 * i / (len(xs) - 1)
        return left + u * (right - left), bottom - rate * (bottom - top)

    for x in xs:
        X, _ = px(x, 0)
        draw.line([X, bottom, X, bottom + 5], fill="black")
        draw.text((X - 10, bottom + 8), str(x), fill="black", font=font)
    draw.text(((left + right) // 2 - 30, bottom + 24), xlabel, fill="black", font=font)
    for j, (variant, points) in enumerate(series.items()):
        colour, shift = COLOURS.get(variant, (0, 0, 0)), 4 * (j - (len(series) - 1) / 2)
        centres = []
        for x, p in points:
            X, Y = px(x, p["rate"])
            X += shift
            _, lo = px(x, p["ci95"][0])
            _, hi = px(x, p["ci95"][1])
            draw.line([X, lo, X, hi], fill=colour, width=2)
            draw.line([X - 4, lo, X + 4, lo], fill=colour)
            draw.line([X - 4, hi, X + 4, hi], fill=colour)
            draw.ellipse([X - 3, Y - 3, X + 3, Y + 3], fill=colour)
            centres.append((X, Y))
        if len(centres) > 1:
            draw.line(centres, fill=colour, width=2)
        legend_y = top - 36 + 14 * j   # above the panel, right of its title
        draw.line([right - 100, legend_y + 6, right - 80, legend_y + 6], fill=colour, width=3)
        draw.text((right - 74, legend_y), variant, fill="black", font=font)


def draw_curves(c, path, title, size=(1000, 460)):
    """Both panels side by side, written as a PNG."""
    image = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    draw.text((20, 8), title, fill="black", font=font)
    half = size[0] // 2
    draw_panel(draw, font, (60, 70, half - 20, size[1] - 60), f"success vs demos per task (step {c['last']})",
               "demos per task", c["demos"])
    draw_panel(draw, font, (half + 60, 70, size[0] - 20, size[1] - 60),
               f"success vs training step ({c['most']} demos per task)", "step", c["steps"])
    image.save(path)


def report(out, title):
    """curves.png and curves.md in `out` from its results.jsonl; returns the table."""
    c = curves(read_rows(os.path.join(out, "results.jsonl")))
    draw_curves(c, os.path.join(out, "curves.png"), title)
    text = table(c)
    with open(os.path.join(out, "curves.md"), "w") as f:
        f.write(text)
    return text


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Flags after -- go to every train_toy.py run (e.g. -- --suite metaworld "
                                       "--tasks reach-v3 --threads 1).")
    p.add_argument("--out", required=True, help="the grid's folder: results.jsonl, runs/, curves.png, curves.md")
    p.add_argument("--demos", type=int, nargs="+", default=[25, 100, 500], help="demos per task (default 25 100 500)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=4000, help="each run's schedule length (default 4000)")
    p.add_argument("--at", type=int, nargs="+", default=None,
                   help="steps at which each run is evaluated (default: --steps only); the last must be --steps")
    p.add_argument("--eval-episodes", type=int, default=50, help="evaluation episodes per task (default 50)")
    p.add_argument("--demo-cache", default=None, help="demo cache folder (default <out>/demos)")
    p.add_argument("--report", action="store_true", help="only draw curves.png and write curves.md")
    p.add_argument("--title", default="DiT4DiT vs action-only", help="the PNG's title")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.at = sorted(set(args.at or [args.steps]))
    for name in ("demos", "seeds", "at"):
        if any(v < (0 if name == "seeds" else 1) for v in getattr(args, name)):
            raise ValueError(f"--{name}: every value must be >= {0 if name == 'seeds' else 1}")
    if args.at[-1] != args.steps:
        raise ValueError(f"--at: the last evaluation step must be --steps ({args.steps}), got {args.at[-1]}")
    if args.eval_episodes < 1:
        raise ValueError(f"--eval-episodes must be >= 1, got {args.eval_episodes}")
    if not args.report:
        run_grid(args, train_args)
    text = report(args.out, args.title)
    print(text)
    print(f"wrote {os.path.join(args.out, 'curves.png')} and curves.md")
    return text


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"bench/curves.py: error: {error}")
