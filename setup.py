"""Build script: computes the one extension ``torchrec_tt._C`` from ``csrc/``.

Static metadata lives in ``pyproject.toml``. Build with
``pip install --no-build-isolation -e .`` so the extension is compiled against
the torch that will import it.

Build flags (environment variables):

* ``TORCHREC_TT_BUILD_EXT=0``: pure-Python install (the reference kernels serve).
* ``TORCHREC_TT_FORCE_CUDA=1``: compile the CUDA sources even without a GPU;
  ``USE_CUDA=0`` never compiles them. Default: CUDA sources are compiled when
  torch is a CUDA build and ``nvcc`` (``CUDA_HOME``) is found.
* ``TORCH_CUDA_ARCH_LIST``: target architectures (default ``9.0`` = sm_90).
* ``MAX_JOBS``: parallel compile jobs (ninja).
* ``DEBUG=1``: ``-O0 -g``.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def _flag(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def _extensions() -> tuple[list, dict]:
    if _flag("TORCHREC_TT_BUILD_EXT", "1") == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force_cuda = _flag("TORCHREC_TT_FORCE_CUDA") == "1"
    use_cuda = _flag("USE_CUDA", "1") != "0" and (
        force_cuda or (torch.version.cuda is not None and CUDA_HOME is not None)
    )
    debug = _flag("DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = [*opt, "-std=c++20", "-fopenmp", "-DPy_LIMITED_API=0x030A0000"]
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    kwargs = {
        "name": "torchrec_tt._C",
        "include_dirs": [str(ROOT / "csrc" / "include")],
        "extra_compile_args": {"cxx": cxx},
        "extra_link_args": ["-fopenmp"],
        "py_limited_api": True,
    }
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += sorted(glob.glob("csrc/**/*.cu", recursive=True))
        kwargs["extra_compile_args"]["cxx"].append("-DTORCHREC_TT_WITH_CUDA")
        nvcc = [*opt, "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-DTORCHREC_TT_WITH_CUDA"]
        # One host compiler for every object: nvcc's default g++ and $CXX can ship different libstdc++
        # headers, and mixing them in one .so crashed std::ostream code (seen on the GPU image).
        if os.environ.get("CXX"):
            nvcc += ["-ccbin", os.environ["CXX"]]
        kwargs["extra_compile_args"]["nvcc"] = nvcc
        ext = CUDAExtension(sources=sources, **kwargs)
    else:
        ext = CppExtension(sources=sources, **kwargs)
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if use_cuda else None,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if use_cuda else None,
        "debug": debug,
    }
    (ROOT / "torchrec_tt" / "_build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    build_ext = BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
