"""Builds the C++ core and the pybind11 module `mistral_cuda._C` through CMake + Ninja.

Extra CMake arguments come from the MC_CMAKE_ARGS environment variable, e.g.
MC_CMAKE_ARGS="-DMC_ENABLE_CUDA=OFF" or "-DCMAKE_CUDA_ARCHITECTURES=80".
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        configure = [
            "cmake",
            "-S", str(ROOT),
            "-B", str(build_dir),
            "-G", "Ninja",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={output_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            *shlex.split(os.environ.get("MC_CMAKE_ARGS", "")),
        ]
        subprocess.check_call(configure)
        jobs = os.environ.get("MC_BUILD_JOBS", str(os.cpu_count() or 2))
        # Every target: the module, and with CUDA the kernel sandboxes, so a compile error in any
        # CUDA source fails the build.
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])


setup(ext_modules=[CMakeExtension("mistral_cuda._C")], cmdclass={"build_ext": CMakeBuild})
