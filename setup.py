"""Build the Cython core. `MATCHER_ANNOTATE=1` writes Cython's HTML annotation next to
the source (to check the matching loop stays free of Python); `MATCHER_DEBUG=1` builds
with bounds checks and without optimisation, for chasing a crash."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("MATCHER_DEBUG") == "1"
directives = {"boundscheck": True, "wraparound": True} if debug else {}
extensions = [
    Extension(
        "matcher._core",
        ["matcher/_core.pyx"],
        extra_compile_args=["-O0", "-g"] if debug else ["-O3"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        annotate=os.environ.get("MATCHER_ANNOTATE") == "1",
        compiler_directives=directives,
        language_level=3,
    )
)
