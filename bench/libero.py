"""Time of one LIBERO control step (suites/libero.py), split into physics (LIBERO's step: 25 physics
steps of 2 ms, the OSC controller, the observables), render (the agentview and wrist cameras at 256x256
through robosuite's offscreen renderer) and preprocessing (the half turn, model_frame's resize, the
state), printed with the machine it ran on. Also the time to build an env and to reset one (LIBERO's
hard reset, the init state, the 10 settle steps), and what the render would cost with shadows,
reflections and multisampling off (a measurement only: the suite renders as the datasets were rendered).

    python -m bench.libero [--task libero_spatial/0] [--steps 40] [--image-size 64]

A measurement to print, never to assert; on a loaded machine the numbers move with the load.
"""
import argparse
import os
import platform
import time

import numpy as np

from bench import cpu_name, load_average


def machine():
    cpu, load = cpu_name(), load_average()
    return (f"{cpu}; {os.cpu_count()} CPUs; load average {load}; OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; MUJOCO_GL={os.environ.get('MUJOCO_GL', 'unset')}; "
            f"python {platform.python_version()}")


def _ms(xs):
    xs = 1000 * np.asarray(xs)
    return f"median {np.median(xs):7.1f} ms   mean {xs.mean():7.1f} ms"


def _steps(env, n):
    parts = {"physics": [], "render": [], "preprocess": [], "total": []}
    action = np.zeros(7, np.float32)
    for _ in range(n):
        t0 = time.perf_counter()
        env.step(action)
        parts["total"].append(time.perf_counter() - t0)
        for k in ("physics", "render", "preprocess"):
            parts[k].append(env.last_timing[k])
    return parts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="libero_spatial/0")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--image-size", type=int, default=64)
    args = p.parse_args(argv)

    from suites import libero as L   # sets MUJOCO_GL=egl unless set, before mujoco is imported

    print(f"machine: {machine()}")
    t0 = time.perf_counter()
    lib = L.require()
    t_import = time.perf_counter() - t0
    import mujoco
    print(f"mujoco {mujoco.__version__} (robosuite shims for mujoco 4: {'on' if lib.mujoco4_patched else 'off'}); "
          f"task {args.task}; {args.steps} steps of the zero action; cameras 2 x {L.CAMERA_SIZE}^2; "
          f"model frame {args.image_size}^2")
    t0 = time.perf_counter()
    env = L.make_env(args.task, image_size=args.image_size)
    t_make = time.perf_counter() - t0
    try:
        resets = []
        for i in range(3):
            t0 = time.perf_counter()
            env.reset(options={"init_state": i})
            resets.append(time.perf_counter() - t0)
        print(f"import + configure LIBERO {t_import:5.1f} s;  make_env {t_make:5.1f} s;  reset (hard reset, init "
              f"state, {L.NOOP_STEPS} settle steps) first {resets[0]:5.1f} s (numba compiles robosuite's "
              f"functions), then {np.median(resets[1:]):5.1f} s")
        parts = _steps(env, args.steps)
        for k in ("physics", "render", "preprocess", "total"):
            print(f"  {k:<10} {_ms(parts[k])}")
        total = np.median(parts["total"])
        print(f"  -> {1 / total:5.2f} control steps/s ({L.CONTROL_DT * 1000:.0f} ms of simulated time each: "
              f"{L.CONTROL_DT / total:4.2f} x real time); render share {np.median(parts['render']) / total:4.0%}")
        L.fast_rendering(env._env.env.sim)   # what make_env(..., render_quality="fast") does
        fast = _steps(env, args.steps)
        print(f"  render with shadows, reflections and multisampling off (render_quality='fast', not the "
              f"datasets' pixels): {_ms(fast['render'])}; total {_ms(fast['total'])}")
        print(f"  one camera only (views=('image',)) renders about half: "
              f"{500 * np.median(parts['render']):.1f} ms ('dataset'), {500 * np.median(fast['render']):.1f} ms ('fast')")
    finally:
        env.close()
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
