"""Builds the C++ packer extension `refit_fast._packing` (csrc/) with pybind11.

Everything else about the package lives in pyproject.toml.
"""
import glob
import os

from setuptools import setup

ext_modules = []
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources:
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    ext_modules.append(
        Pybind11Extension(
            "refit_fast._packing",
            sources,
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    )
    setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
else:
    setup()
