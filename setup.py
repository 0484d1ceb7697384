"""The native pieces: the decode step in C (iteralite/runtime/native/itl_step.c), the rANS coder
of entropy-coded codes (itl_rans.c) and the artifact reader (itl_artifact.c), built as one shared
library loaded with ctypes (no Python C API). Portable flags: its AVX2 code is compiled per function
(`__attribute__((target))`) and chosen at run time. The text side (itl_text.c: tokenizer; itl_sample.c:
sampler) is a second, separate library. After the libraries, the standalone command-line runtime
`iteralite/runtime/native/itl-run` (itl_run.c + the reader, generation session, step, coder and text
side) is linked as an executable with the same compiler.

Everything native is optional: without a compiler the install still succeeds, the native runtime
reports itself unavailable, entropy coding uses its Python twin and there is no itl-run. Everything
else about the package is in pyproject.toml."""
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = "iteralite/runtime/native"
FLAGS = ["-O3", "-std=gnu11"]
TEXT_FLAGS = FLAGS + ["-ffp-contract=off"]  # no FMA contraction: the sampler's arithmetic is the same everywhere
TEXT_SOURCES = ["itl_text.c", "itl_sample.c"]  # the tokenizer, the sampler (itl_text.h)
# the artifact reader: the container, the JSON header, the model layout, the codecs, sha256
READER_SOURCES = ["itl_artifact.c", "itl_json.c", "itl_layout.c", "itl_codecs.c", "itl_sha256.c"]
RUN_SOURCES = ["itl_run.c", *READER_SOURCES, "itl_gen.c", "itl_step.c", "itl_rans.c"]


class build_ext_and_itl_run(build_ext):
    """build_ext, then the itl-run executable next to the libraries (in the source tree for
    `--inplace` and editable installs, else in build_lib); a failure only warns."""

    def run(self):
        super().run()
        try:
            self._link_itl_run()
        except Exception as e:  # a missing or failing compiler: the install goes on without itl-run
            self.warn(f"itl-run was not built ({' '.join(str(e).split())}); the Python runtimes still work")

    def _link_itl_run(self):
        from setuptools._distutils.ccompiler import new_compiler
        from setuptools._distutils.sysconfig import customize_compiler

        cc = new_compiler(compiler=self.compiler if isinstance(self.compiler, str) else None, force=self.force)
        customize_compiler(cc)
        tmp = os.path.join(self.build_temp, "itl-run")
        objs = cc.compile([f"{NATIVE}/{s}" for s in RUN_SOURCES], output_dir=tmp, extra_postargs=FLAGS)
        objs += cc.compile([f"{NATIVE}/{s}" for s in TEXT_SOURCES], output_dir=tmp, extra_postargs=TEXT_FLAGS)
        inplace = self.inplace or getattr(self, "editable_mode", False)
        out_dir = NATIVE if inplace else os.path.join(self.build_lib, NATIVE)
        link = ["-s"] if sys.platform.startswith("linux") else []  # no debug symbols in the binary
        cc.link_executable(objs, "itl-run", output_dir=out_dir, libraries=["m"], extra_postargs=link)


setup(ext_modules=[Extension("iteralite.runtime.native._itl_native",
                             sources=[f"{NATIVE}/{s}" for s in ["itl_step.c", "itl_rans.c", *READER_SOURCES]],
                             extra_compile_args=FLAGS, libraries=["m"], optional=True),
                   # the text side (tokenizer, sampler): its own library, so it never breaks the step's build
                   Extension("iteralite.runtime.native._itl_text", sources=[f"{NATIVE}/{s}" for s in TEXT_SOURCES],
                             extra_compile_args=TEXT_FLAGS, optional=True)],
      cmdclass={"build_ext": build_ext_and_itl_run})
