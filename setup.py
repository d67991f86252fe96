"""Build shim: all metadata is in pyproject.toml; this file adds the optional native extension.

csrc/packing.cpp becomes mr1fast.trainer._native (torch's cpp_extension, C++ only: the data path it
holds runs on the host). It is built where torch is importable at build time, which pip's
isolated build environment is not: setup.sh builds it in place afterwards with
`python setup.py build_ext --inplace`. A failed build (no compiler) is a warning, never an
error; mr1fast then uses the Python reference of the same functions (mr1fast/trainer/packing.py).
"""
import sys

from setuptools import setup


def native_build():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # pip's isolated build: no torch, no extension
        return {}

    class OptionalBuild(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 (no compiler, no headers: all the same)
                print(f"mr1fast: the native extension was not built ({type(e).__name__}: {e}); "
                      "the Python fallback will be used", file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                print(f"mr1fast: the native extension was not built ({type(e).__name__}: {e}); "
                      "the Python fallback will be used", file=sys.stderr)

    ext = CppExtension("mr1fast.trainer._native", ["csrc/packing.cpp"],
                       extra_compile_args=["-O3"])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuild.with_options(
        use_ninja=False)}}


setup(**native_build())
