"""Whole-model timings on the `toy` preset (CPU).

    python -m bench.model [--repeats 20] [--threads 2]

(a) predict_action, batch 1: the path dit4dit.py implements (the extraction pass stops after
    block `extract_layer`; the action DiT's cross-attention K/V of h, and the time embeddings,
    modulations and state token of the fixed Euler schedule, are computed once for all steps)
    against the naive path of the authors' release (all video blocks and the final layer run, h is
    read from block `extract_layer`, K/V and everything else are recomputed at every Euler step).
    The release's path is tests/oracle.py's, composed from public pieces of dit4dit.py
    (DiT4DiT.video_forward, future_noise), so the module keeps one inference path; both paths
    draw the same noise and their actions are checked to agree.
(b) one toy training step (batch 32) and predict_action with the fused kernels on and off
    (select_backend("1") vs "0"); skipped when the extension is not built.
(c) one toy training step (batch 32, AdamW) at the preset's R action-noise draws per sample
    against R = 4, the release's: what the preset's choice of R saves per step.

Variants are timed interleaved (A, B, A, B, ...) and reported as medians, so a change of
machine load during the run affects both alike.
"""
import argparse
import os
import platform
import statistics
import time

import torch

import dit4dit as d


def hardware():
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}; {os.cpu_count()} logical CPUs; torch {torch.__version__} using {torch.get_num_threads()} "
            f"threads; load average {load:.1f}")


def time_interleaved(fns, repeats, warmup=2):
    """Median wall time in ms of each callable, calls interleaved."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(ts) for name, ts in times.items()}


def toy_inputs(cfg, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    H = cfg.image_size
    return dict(video=torch.rand(B, 3, 1 + cfg.num_future_frames, H, H, generator=g) * 2 - 1,
                state=torch.rand(B, cfg.state_dim, generator=g) * 2 - 1,
                actions=torch.rand(B, cfg.action_horizon, cfg.action_dim, generator=g) * 2 - 1,
                instruction=["push the red block onto the blue pad"] * B)


def trained_like(model, seed=0):
    """Random weights in the zero-initialized layers, so no path is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def bench_inference_paths(repeats):
    from tests.oracle import release_predict_action  # the repository's tests folder: run from its root

    torch.manual_seed(0)
    model = trained_like(d.DiT4DiT(d.make_config("toy"))).eval()
    cfg = model.config
    batch = toy_inputs(cfg, 1)
    obs, state, text = batch["video"][:, :, 0], batch["state"], batch["instruction"]
    with torch.no_grad():
        fast = model.predict_action(obs, state, text, generator=torch.Generator().manual_seed(1))
        naive = release_predict_action(model, obs, state, text, torch.Generator().manual_seed(1))
    diff = (fast - naive).abs().max().item()
    g = torch.Generator()

    def run_fast():
        model.predict_action(obs, state, text, generator=g)

    def run_naive():  # same grad mode as predict_action, so only the paths differ
        with torch.inference_mode():
            release_predict_action(model, obs, state, text, g)

    ms = time_interleaved({"early-exit + cached K/V": run_fast, "naive (full forward, K/V per step)": run_naive},
                          repeats)
    (name_f, t_f), (name_n, t_n) = ms.items()
    # where the time goes: the video pass alone (early exit vs all blocks + final layer)
    with torch.no_grad():
        text_tokens = model.encode_text(text)
        cond = model.tokenizer.encode(obs[:, :, None])  # (1, C, 1, h, w)
        future, tau_f = model.future_noise(cond), torch.full((1,), cfg.tau_f)
        video_ms = time_interleaved(
            {"exit": lambda: model.video_forward(cond, future, tau_f, text_tokens, stop_after=cfg.extract_layer),
             "full": lambda: model.video_forward(cond, future, tau_f, text_tokens)}, repeats)
    print(f"(a) predict_action, toy preset, batch 1, backend {d.backend()}: extract_layer {cfg.extract_layer} "
          f"of {cfg.video_depth} blocks, {cfg.num_action_steps} Euler steps (max |diff| of actions {diff:.1e})")
    print(f"    {name_f:38s} {t_f:8.2f} ms")
    print(f"    {name_n:38s} {t_n:8.2f} ms")
    print(f"    speed-up {t_n / t_f:.2f}x")
    print(f"    of which the video pass: {video_ms['exit']:.2f} ms (early exit) vs {video_ms['full']:.2f} ms "
          f"(all blocks), {video_ms['full'] / video_ms['exit']:.2f}x; the {cfg.num_action_steps} action-DiT "
          f"steps are common to both paths")


def bench_kernels(repeats):
    try:
        d.select_backend("1")
    except RuntimeError as err:
        print(f"(b) skipped: {err}")
        return
    torch.manual_seed(0)
    model = trained_like(d.DiT4DiT(d.make_config("toy")))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = toy_inputs(model.config, 32)
    one = toy_inputs(model.config, 1)

    def train_step():
        opt.zero_grad(set_to_none=True)
        model.loss(batch)["loss"].backward()
        opt.step()

    def predict():
        model.predict_action(one["video"][:, :, 0], one["state"], one["instruction"])

    def with_backend(mode, fn):
        def run():
            d.select_backend(mode)
            fn()
        return run

    ms = time_interleaved({"train kernels": with_backend("1", train_step),
                           "train torch": with_backend("0", train_step)}, max(3, repeats // 4), warmup=1)
    model.eval()
    ms.update(time_interleaved({"predict kernels": with_backend("1", predict),
                                "predict torch": with_backend("0", predict)}, repeats))
    d.select_backend("0")
    print("(b) fused kernels on (select_backend('1')) vs off ('0'), toy preset")
    for what, label in (("train", "training step, batch 32"), ("predict", "predict_action, batch 1")):
        k, t = ms[f"{what} kernels"], ms[f"{what} torch"]
        print(f"    {label:26s} kernels {k:9.2f} ms   torch {t:9.2f} ms   speed-up {t / k:.2f}x")


def bench_repeat(repeats):
    steps = {}
    for R in sorted({d.make_config("toy").repeat, 4}):
        torch.manual_seed(0)
        model = trained_like(d.DiT4DiT(d.make_config("toy", repeat=R)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch, g = toy_inputs(model.config, 32), torch.Generator().manual_seed(0)

        def step(model=model, opt=opt, batch=batch, g=g):
            opt.zero_grad(set_to_none=True)
            model.loss(batch, g)["loss"].backward()
            opt.step()
        steps[f"R = {R}"] = step
    ms = time_interleaved(steps, max(3, repeats // 2), warmup=1)
    print(f"(c) toy training step, batch 32, AdamW, backend {d.backend()}: R action-noise draws per sample")
    for name, t in ms.items():
        print(f"    {name:8s} {t:9.2f} ms   {ms['R = 4'] / t:.2f}x of R = 4")


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    print(hardware())
    bench_inference_paths(args.repeats)
    bench_kernels(args.repeats)
    bench_repeat(args.repeats)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per variant")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    main(parser.parse_args())
