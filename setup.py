"""Builds the GTC codec (csrc/gtc_codec.cpp) as ``disttrain._gtc_codec``.

Everything else about the package lives in pyproject.toml; this file exists
only because a compiled extension needs a little logic: OpenMP is used when
the compiler accepts ``-fopenmp`` and silently left out otherwise (the codec
is then single-threaded but still correct).
"""
import os
import subprocess
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


def _compiler_accepts(flag: str) -> bool:
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            result = subprocess.run(
                [cxx, flag, src, "-o", os.path.join(tmp, "probe")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        except OSError:
            return False
        return result.returncode == 0


openmp = [] if sys.platform == "win32" else (["-fopenmp"] if _compiler_accepts("-fopenmp") else [])

setup(
    ext_modules=[
        Pybind11Extension(
            "disttrain._gtc_codec",
            ["csrc/gtc_codec.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3", *openmp],
            extra_link_args=openmp,
            define_macros=[("DISTTRAIN_OPENMP", "1")] if openmp else [],
        )
    ],
    cmdclass={"build_ext": build_ext},
)
