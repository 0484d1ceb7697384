"""The native pieces: the decode step in C (iteralite/runtime/native/itl_step.c) and the rANS coder
of entropy-coded codes (itl_rans.c), built as one shared library loaded with ctypes (no Python C
API). Portable flags: its AVX2 code is compiled per function (`__attribute__((target))`) and
chosen at run time. Optional: without a compiler the install still succeeds, the native runtime
reports itself unavailable and entropy coding uses its Python twin. The text side (itl_text.c:
tokenizer and sampler) is a second, separate library. Everything else about the package is in
pyproject.toml."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("iteralite.runtime.native._itl_native",
                             sources=["iteralite/runtime/native/itl_step.c",
                                      "iteralite/runtime/native/itl_rans.c"],
                             extra_compile_args=["-O3", "-std=gnu11"], libraries=["m"], optional=True),
                   # the text side (tokenizer, sampler): its own library, so it never breaks the step's
                   # build; no FMA contraction, so the sampler's arithmetic is the same everywhere
                   Extension("iteralite.runtime.native._itl_text",
                             sources=["iteralite/runtime/native/itl_text.c"],
                             extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off"], optional=True)])
