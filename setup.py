"""Build of the compiled ShiftKV op, mmshiftkv._C (package metadata lives in pyproject.toml).

    pip install --no-build-isolation -e .

The CPU kernel is always built; its GEMM and per-logit part (csrc/shiftkv_cpu_kernels.cpp) is
compiled once per CPU capability with ATen's flags and macros, as ATen compiles its own kernels
(DEFAULT everywhere, AVX2 and AVX512 on x86-64), and the op picks one at run time from ATen's
capability (which ATEN_CPU_CAPABILITY sets). The CUDA kernel is built when torch is a CUDA build and
a CUDA toolkit is found; FORCE_CUDA=1 makes it mandatory (a missing toolkit is an error), FORCE_CUDA=0
skips it. The toolkit root comes from CUDA_HOME, else from the `nvcc` on PATH, which may be a
wrapper script naming the real compiler (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`).
TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0".
"""

from __future__ import annotations

import os
import platform
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from setuptools import setup

CSRC = Path("csrc")
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3"]
CPU_KERNELS = CSRC / "shiftkv_cpu_kernels.cpp"
# ATen's flags per CPU capability (cmake/Codegen.cmake), with its CPU_CAPABILITY macros.
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}


def _cpu_capabilities() -> list[str]:
    if platform.machine().lower() in ("x86_64", "amd64"):
        return list(CPU_CAPABILITY_FLAGS)
    return ["DEFAULT"]


def _toolkit_root(candidate: Path) -> Path | None:
    """``candidate`` if it is a CUDA toolkit root (has the runtime header and nvcc)."""
    if (candidate / "include" / "cuda_runtime.h").is_file() and (candidate / "bin" / "nvcc").is_file():
        return candidate
    return None


def _cuda_home_from_nvcc() -> Path | None:
    """The toolkit root behind the `nvcc` on PATH, following a wrapper script that execs the real one."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    path = Path(nvcc).resolve()
    root = _toolkit_root(path.parent.parent)
    if root is not None:
        return root
    try:
        text = path.read_text(errors="ignore")[:4096]
    except OSError:
        return None
    for match in re.finditer(r"(/[^\s\"']+)/bin/nvcc\b", text):
        root = _toolkit_root(Path(match.group(1)).resolve())
        if root is not None:
            return root
    return None


def _cuda_home() -> Path | None:
    if os.environ.get("CUDA_HOME"):
        root = _toolkit_root(Path(os.environ["CUDA_HOME"]))
        if root is None:
            raise RuntimeError(
                f"CUDA_HOME={os.environ['CUDA_HOME']} has no include/cuda_runtime.h and bin/nvcc"
            )
        return root
    return _cuda_home_from_nvcc()


def _build_cuda() -> bool:
    force = os.environ.get("FORCE_CUDA")
    if force == "0":
        return False
    cuda_home = _cuda_home()
    if force == "1":
        if torch.version.cuda is None:
            raise RuntimeError(
                "FORCE_CUDA=1 but this torch is a CPU-only build: it cannot compile CUDA extensions"
            )
        if cuda_home is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit found: set CUDA_HOME to the toolkit root")
    if torch.version.cuda is None or cuda_home is None:
        return False
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = str(cuda_home)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return True


def _extensions() -> list:
    with_cuda = _build_cuda()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = [str(CSRC / "shiftkv_op.cpp"), str(CSRC / "shiftkv_cpu.cpp")]
    macros = [(f"MMSHIFTKV_CPU_{capability}", "1") for capability in _cpu_capabilities()]
    options = {
        "name": "mmshiftkv._C",
        "include_dirs": [str(CSRC.resolve())],
        "extra_link_args": ["-fopenmp"],
    }
    if with_cuda:
        return [
            CUDAExtension(
                sources=[*sources, str(CSRC / "shiftkv_cuda.cu")],
                define_macros=[*macros, ("MMSHIFTKV_WITH_CUDA", "1")],
                extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
                **options,
            )
        ]
    arguments = {"define_macros": macros, "extra_compile_args": {"cxx": CXX_FLAGS}}
    return [CppExtension(sources=sources, **arguments, **options)]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class BuildWithCpuKernels(BuildExtension):
        """Compiles the CPU kernels once per CPU capability (own flags and macros, in parallel) and
        links every copy into the extension."""

        def _compile_kernels(self, ext, capability: str) -> list[str]:
            macros = [("CPU_CAPABILITY", capability), (f"CPU_CAPABILITY_{capability}", None)]
            flags = [*ext.extra_compile_args["cxx"], *CPU_CAPABILITY_FLAGS[capability]]
            return self.compiler.compile(
                [str(CPU_KERNELS.resolve())],
                output_dir=os.path.join(self.build_temp, f"cpu_{capability.lower()}"),
                macros=[*ext.define_macros, *macros],
                include_dirs=ext.include_dirs,
                extra_postargs={"cxx": flags, "nvcc": []},
                depends=ext.depends,
            )

        def build_extension(self, ext) -> None:
            with ThreadPoolExecutor() as pool:
                compiled = pool.map(lambda isa: self._compile_kernels(ext, isa), _cpu_capabilities())
                objects = [obj for objs in compiled for obj in objs if obj not in ext.extra_objects]
            ext.extra_objects = [*ext.extra_objects, *objects]
            super().build_extension(ext)

    return BuildWithCpuKernels.with_options(use_ninja=shutil.which("ninja") is not None)


setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext()})
