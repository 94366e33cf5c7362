"""Finding cuBLAS for the CUDA backend, which opens libcublas.so.13 at run time.

A CUDA build of torch has usually loaded it already. Otherwise the nvidia-cublas wheel's copy
is loaded here by path, so the core's dlopen("libcublas.so.13") then finds it by name.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

_SONAME = "libcublas.so.13"


def _wheel_candidates():
    for base in map(Path, sys.path):
        for sub in ("nvidia/cu13/lib", "nvidia/cublas/lib"):
            candidate = base / sub / _SONAME
            if candidate.is_file():
                yield candidate


def preload_cublas() -> None:
    """Makes libcublas.so.13 loadable by name; leaves the error to the core if none is found."""
    if os.environ.get("MC_CUBLAS_LIBRARY"):
        return
    try:
        ctypes.CDLL(_SONAME, mode=ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    for candidate in _wheel_candidates():
        try:
            ctypes.CDLL(str(candidate), mode=ctypes.RTLD_GLOBAL)
            return
        except OSError:
            continue
