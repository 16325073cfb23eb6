"""Build memoir and memoir_kernels; compile the native ops the machine can build.

    pip install --no-build-isolation -e .

Always builds the C++ CPU kernels (``memoir_kernels._C``). The CUDA kernels join when torch has
CUDA and nvcc is present, unless ``MEMOIR_SKIP_CUDA_BUILD=1``. ``TORCH_CUDA_ARCH_LIST`` and
``MAX_JOBS`` are honoured by torch's build helpers. Nothing is run or downloaded at install time.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def _toolkit_root() -> str | None:
    """The CUDA toolkit directory (with include/cuda_runtime_api.h) when CUDA_HOME / CUDA_PATH are unset.

    torch guesses the toolkit from the nvcc on PATH as nvcc's grandparent directory. Where that nvcc
    is a wrapper script (``/usr/local/bin/nvcc`` exec'ing ``/usr/local/cuda-13.0/bin/nvcc`` on these
    machines) the guess is ``/usr/local`` and the C++ sources cannot find the CUDA headers.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return None
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates += sorted(glob.glob("/usr/local/cuda")) + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime_api.h")):
            return root
    return None


_found_toolkit = _toolkit_root()
if _found_toolkit:  # before torch.utils.cpp_extension reads it at import
    os.environ["CUDA_HOME"] = _found_toolkit

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - torch is a build requirement
    sys.exit("memoir: install torch==2.13.0 first, then build with `pip install --no-build-isolation -e .`")


def _cuda_skip_reason() -> str:
    if os.environ.get("MEMOIR_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "MEMOIR_SKIP_CUDA_BUILD is set"
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "nvcc not found"
    return ""


def _native_extension():
    cpu_sources = ["csrc/ops.cpp", "csrc/mask_search_cpu.cpp", "csrc/mask_search_topk_cpu.cpp"]
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17"]
    if os.uname().machine in ("x86_64", "AMD64"):
        cxx_flags.append("-mpopcnt")
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    reason = _cuda_skip_reason() if cuda_sources else "no CUDA sources in this version"
    if reason:
        print(f"memoir: building the CPU kernels only ({reason})")
        return CppExtension(
            "memoir_kernels._C", cpu_sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"]
        )
    return CUDAExtension(
        "memoir_kernels._C",
        cpu_sources + cuda_sources,
        define_macros=[("MEMOIR_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="memoir",
    version="0.1.0",
    description="MEMOIR lifelong model editing for Hugging Face causal LMs, with GPU kernels",
    packages=find_packages(include=["memoir", "memoir.*", "memoir_kernels", "memoir_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "safetensors", "tqdm", "pyyaml"],
    extras_require={"hf": ["transformers", "accelerate", "gguf"]},
    ext_modules=[_native_extension()],
    # ninja (when installed) compiles sources in parallel and honours MAX_JOBS; torch falls back to
    # setuptools' compiler when it is missing.
    cmdclass={"build_ext": BuildExtension},
    entry_points={"console_scripts": ["memoir=memoir.cli:main"]},
)
