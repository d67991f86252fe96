"""Build shim: all metadata is in pyproject.toml; this file adds the optional native extensions.

csrc/packing.cpp becomes mr1fast.trainer._native (the packed forwards' host data path) and
csrc/cpu_rows.cpp becomes mr1fast.kernels._cpu (the softmax rows of the loss's torch
implementation on the CPU), with torch's cpp_extension, C++ only. _cpu is compiled for the
build machine's SIMD capability as torch reports it (AVX512, AVX2 or neither) and reports it
back, so a copy on a machine without those instructions is never called. It is built where torch is importable at build time, which pip's
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

    import torch

    simd = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                       "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
            "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]}
    capability = torch.backends.cpu.get_cpu_capability()
    flags = simd.get("AVX512" if capability.startswith("AVX512") else capability, [])
    exts = [CppExtension("mr1fast.trainer._native", ["csrc/packing.cpp"],
                         extra_compile_args=["-O3"]),
            # -fopenmp: at::parallel_for is inline OpenMP (torch's own libgomp at run time)
            CppExtension("mr1fast.kernels._cpu", ["csrc/cpu_rows.cpp"],
                         extra_compile_args=["-O3", "-fopenmp"] + flags,
                         extra_link_args=["-fopenmp"])]
    return {"ext_modules": exts, "cmdclass": {"build_ext": OptionalBuild.with_options(
        use_ninja=False)}}


setup(**native_build())
