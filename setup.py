"""Package metadata and the build of the fused kernels.

    python setup.py build_ext --inplace

builds `kernels/_C` from the C++ sources in kernels/csrc/ (CPU kernels, always) and,
when torch is a CUDA build, a CUDA toolkit is found and either a GPU is visible or
FORCE_CUDA=1 is set, the CUDA sources in kernels/csrc/cuda/ as well.
TORCH_CUDA_ARCH_LIST chooses the GPU architectures (for example "8.0;9.0").
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_wanted():
    """True when the CUDA kernels should be built; FORCE_CUDA=1 without a CUDA toolchain is an error."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    forced = os.environ.get("FORCE_CUDA", "0") == "1"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is not a CUDA build")
    if nvcc is None or not os.path.exists(nvcc) or not os.path.exists(
            os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        missing.append(f"no CUDA toolkit (nvcc and include/cuda_runtime.h) at CUDA_HOME={CUDA_HOME}; "
                       "set CUDA_HOME to the toolkit folder")
    if missing:
        if forced:
            raise RuntimeError("FORCE_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(missing))
        return False
    return forced or torch.cuda.is_available()


def wheel_cuda_includes():
    """CUDA headers shipped inside the installed `nvidia` wheels (cuda_runtime, cublas, ...).

    torch's CUDA build brings some headers (for example cusparse.h) only through
    these wheels, so a bare toolkit may lack them."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        found += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        found += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dict.fromkeys(found) if os.path.isdir(d)]


def torch_present():
    """pip's isolated build environment has no torch: the wheel is then pure Python and dit4dit
    runs on the PyTorch reference ops (build the kernels in a clone with build_ext --inplace, or
    install with `pip install --no-build-isolation .`)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        print("dit4dit: torch is not importable at build time: the fused kernels are not built "
              "(the pure-PyTorch reference ops are used)")
        return False
    return True


def extensions():
    if not torch_present():
        return []
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpu_sources = sorted(glob.glob(os.path.join("kernels", "csrc", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]  # torch 2.14 ATen headers need C++20
    if not cuda_wanted():
        return [CppExtension("kernels._C", cpu_sources, extra_compile_args={"cxx": cxx_flags},
                             extra_link_args=["-fopenmp"])]
    cuda_sources = sorted(glob.glob(os.path.join("kernels", "csrc", "cuda", "*.cu")))
    nvcc_flags = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]  # ATen headers need C++20
    if os.environ.get("DIT4DIT_PTXAS_VERBOSE", "0") == "1":
        nvcc_flags.append("-Xptxas=-v")
    return [CUDAExtension("kernels._C", cpu_sources + cuda_sources,
                          include_dirs=[os.path.join(ROOT, "kernels", "csrc")] + wheel_cuda_includes(),
                          define_macros=[("DIT4DIT_WITH_CUDA", "1")],
                          extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                          extra_link_args=["-fopenmp"])]


def build_ext_class():
    if not torch_present():
        from setuptools.command.build_ext import build_ext

        return build_ext
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    name="dit4dit",
    version="0.1.0",
    description="A compact reference implementation of DiT4DiT (video DiT + action DiT, dual flow matching)",
    py_modules=["dit4dit", "train_toy", "eval_sim"],
    packages=["kernels", "bridges", "suites", "bench"],
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "pillow", "tqdm", "gymnasium>=1.0", "mujoco>=3.2"],
    extras_require={"data": ["pyarrow>=26", "av>=18"],  # LeRobot datasets (bridges/lerobot.py)
                    "metaworld": ["metaworld==3.1.1"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
)
