"""Build of bitcompile's optional C kernels (``bitcompile.kernels._bitcpm_cpu``).

Everything else is in pyproject.toml. The extension is optional: without a working C
compiler, on an unsupported platform, or with ``BITCOMPILE_NO_EXT=1``, the build prints a
warning and the package installs anyway; ``bitcompile.kernels.cpu.available()`` is then
False and the reference kernels run. The C code needs no PyTorch headers and is loaded
with ctypes, so the shared object has no Python ABI dependency beyond its file name.
"""

import os
import shutil
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "bitcompile/kernels/csrc"


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install: a failed C build leaves the reference kernels."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # no compiler at all, or a platform distutils cannot drive
            self._skip(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
            return
        except Exception as e:
            if "-fopenmp" not in ext.extra_compile_args:
                self._skip(e)
                return
            sys.stderr.write(f"WARNING: building bitcompile's C kernels with OpenMP failed ({e}); retrying with pthreads\n")
        ext.extra_compile_args = [a for a in ext.extra_compile_args if a != "-fopenmp"]
        ext.extra_link_args = [a for a in ext.extra_link_args if a != "-fopenmp"]
        try:
            super().build_extension(ext)
        except Exception as e:
            self._skip(e)

    def copy_file(self, infile, outfile, *args, **kwargs):
        # NOTE: replace a built library atomically (editable installs copy it into the source
        # tree): writing over a .so that a running process has mapped would crash that process.
        if not str(outfile).endswith((".so", ".pyd", ".dylib")) or self.dry_run:
            return super().copy_file(infile, outfile, *args, **kwargs)
        tmp = f"{outfile}.tmp{os.getpid()}"
        shutil.copyfile(infile, tmp)
        os.replace(tmp, outfile)
        return outfile, 1

    @staticmethod
    def _skip(e):
        sys.stderr.write(
            "WARNING: bitcompile's C kernels could not be built "
            f"({type(e).__name__}: {e}); installing without them, the reference kernels will run.\n"
        )


def extensions():
    if os.environ.get("BITCOMPILE_NO_EXT", "") not in ("", "0"):
        return []
    unix = os.name == "posix"
    return [
        Extension(
            "bitcompile.kernels._bitcpm_cpu",
            sources=[f"{CSRC}/{name}" for name in ("bc_generic.c", "bc_avx2.c", "bc_avx512.c", "bc_avx512_gfni.c", "bc_dense.c", "bc_passes.c", "bc_dispatch.c", "bc_probe.c", "bc_t5.c")],
            depends=[f"{CSRC}/bc_kernels.h", f"{CSRC}/bc_avx512.c"],
            include_dirs=[CSRC],
            # NOTE: -ffp-contract=off keeps a*b+c as two roundings, as the reference computes it.
            # NOTE: -fopenmp makes the kernels share torch's OpenMP threads (torch ships libgomp.so.1
            # and loads it first, so ours resolves to the same runtime): two thread pools on the
            # same cores made 2-thread serving slower than 1 thread. Without OpenMP, a pthread pool.
            extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"] if unix else [],
            extra_link_args=["-fopenmp"] if unix else [],
            libraries=["pthread"] if unix and sys.platform != "darwin" else [],
            optional=True,
        )
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
