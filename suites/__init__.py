"""The simulated benchmarks behind one small interface, and the seeds they share.

A suite is a module of this package with
    NAME, INSTALL_HINT (the pip command of its optional dependency, or None), require()
    TASKS                 name -> task with .name, .instruction, .max_steps
    get_task(name)        ValueError naming the known tasks
    demo_seeds(task, n), eval_seeds(task, n)   from DEMO_SEEDS and EVAL_SEEDS below
    make_env(task, image_size=64, seed=None)   a gymnasium.Env: obs {"image": uint8 (S, S, 3),
                          "state": float32 (P,)}, action float32 (A,) in [-1, 1],
                          env.unwrapped.instruction, info["success"], truncation at max_steps
    scripted_expert(env)  obs -> action, reading the simulator's privileged state
    STATE_DIM, ACTION_DIM, CONTROL_DT, PHYSICS_DT, SUBSTEPS
get_suite(name) imports one lazily, so an optional simulator is needed only when it is used.
A new benchmark is a new module here and a line in SUITES.
"""
import importlib
import os

# Offscreen GL without a display. MuJoCo reads this when it is first imported: import a suite
# before mujoco (or set MUJOCO_GL yourself) for the default to apply.
os.environ.setdefault("MUJOCO_GL", "egl")

import torch._dynamo  # noqa: E402,F401  before mujoco: Triton's LLVM must load before the EGL
                      # renderer loads Mesa's LLVM, or a later torch.compile segfaults the process

SUITES = ("toy", "metaworld", "libero")

# Seeds: demos come from the first range, evaluation from the second; the two never meet.
DEMO_SEEDS = range(0, 1_000_000)
EVAL_SEEDS = range(1_000_000, 2_000_000)


def seeds_for(get_task, task, n, evaluation):
    """The n demo (evaluation=False) or evaluation seeds of `task`; the same numbers for every
    task of a suite, the two ranges disjoint. ValueError on an unknown task or too many seeds."""
    get_task(task)
    seeds = EVAL_SEEDS if evaluation else DEMO_SEEDS
    if n > len(seeds):
        raise ValueError(f"episodes={n}: at most {len(seeds)} {'evaluation' if evaluation else 'demo'} seeds")
    return list(seeds[:n])


def get_suite(name):
    """The module of suite `name`, its optional dependency checked (ModuleNotFoundError naming
    the install command); ValueError naming the known suites for an unknown name."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known suites: {list(SUITES)}")
    suite = importlib.import_module(f"suites.{name}")
    suite.require()
    return suite
