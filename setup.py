"""Build of the gwcore Cython core (gwcore._dedup).

Only build flags are read from the environment here; runtime settings live in gwcore/config.py.

Without a flag: the release build, -O2 and stripped (no debug info, no symbol table).

* GWCORE_DEBUG=1         debug build: bounds checks, line tracing, -O0 -g, GWCORE_DEBUG macro
* GWCORE_FUZZ=1          fuzz build (fuzz/, docs/development.md): clang with
                         -fsanitize=fuzzer-no-link,address, the debug build's checks without line
                         tracing; it imports only under the sanitizer preload fuzz/run sets up
* GWCORE_ANNOTATE=1      write the Cython HTML annotation next to the source
* GWCORE_CYTHON_ALWAYS=1 re-cythonize even when the .c file looks current
"""

import os
import pathlib

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

HERE = pathlib.Path(__file__).parent
MODE_FILE = HERE / "build" / "gwcore-mode"


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "no")


# What a fuzz build compiles and links with (clang only; the sanitizer runtime and libFuzzer are
# not linked in: the fuzz runner preloads them, see fuzz/run).
FUZZ_FLAGS = ["-fsanitize=fuzzer-no-link,address", "-fno-omit-frame-pointer"]
# A release build (the default, and every wheel): optimised, stripped.
RELEASE_COMPILE_ARGS = ["-O2", "-g0"]
RELEASE_LINK_ARGS = ["-s"]


def _mode() -> str:
    if _flag("GWCORE_FUZZ"):
        if _flag("GWCORE_DEBUG"):
            raise SystemExit("setup.py: GWCORE_FUZZ and GWCORE_DEBUG are separate builds; set one")
        return "fuzz"
    return "debug" if _flag("GWCORE_DEBUG") else "release"


class build_ext(_build_ext):
    def finalize_options(self) -> None:
        # cythonize here, not at import time: pip queries setup.py more than once per install.
        if getattr(self, "_gwcore_cythonized", False):
            return super().finalize_options()
        from Cython.Build import cythonize

        mode = self._gwcore_mode = _mode()
        # the debug and fuzz builds keep the checks; only the debug build traces lines
        checked = mode != "release"
        # A build of one mode must never reuse another mode's .c: force when the mode changes.
        previous = MODE_FILE.read_text() if MODE_FILE.exists() else ""
        force = _flag("GWCORE_CYTHON_ALWAYS") or previous != mode
        directives = {
            "language_level": 3,
            "embedsignature": True,
            "auto_pickle": False,
            "autotestdict": False,
            "boundscheck": checked,
            "wraparound": checked,
            "cdivision": not checked,
        }
        if mode == "release":
            # What is shipped carries no debug info or symbol table (about 2.6 MB with them, 0.4 MB
            # without): -g0 after the interpreter's own -g, and -s when linking.
            for ext in self.distribution.ext_modules:
                ext.extra_compile_args = [*RELEASE_COMPILE_ARGS]
                ext.extra_link_args = [*RELEASE_LINK_ARGS]
        elif mode == "debug":
            directives["linetrace"] = True
            for ext in self.distribution.ext_modules:
                ext.define_macros = [("GWCORE_DEBUG", "1"), ("CYTHON_TRACE_NOGIL", "1")]
                ext.extra_compile_args = ["-O0", "-g", "-UNDEBUG"]
                ext.extra_link_args = []  # keep the debug info (not the release build's -s)
        elif mode == "fuzz":
            for ext in self.distribution.ext_modules:
                ext.define_macros = [("GWCORE_DEBUG", "1")]
                ext.extra_compile_args = ["-O1", "-g", "-UNDEBUG", *FUZZ_FLAGS]
                ext.extra_link_args = list(FUZZ_FLAGS)
        self.distribution.ext_modules[:] = cythonize(
            self.distribution.ext_modules,
            compiler_directives=directives,
            annotate=_flag("GWCORE_ANNOTATE"),
            force=force,
        )
        MODE_FILE.parent.mkdir(exist_ok=True)
        MODE_FILE.write_text(mode)
        self._gwcore_cythonized = True
        super().finalize_options()

    def build_extensions(self) -> None:
        if getattr(self, "_gwcore_mode", "") == "fuzz" and "CC" not in os.environ:
            # sysconfig's compiler (usually gcc) cannot instrument for libFuzzer: the same command
            # lines with clang. A CC in the environment (CC=clang-14) is used as it is.
            for name in ("compiler", "compiler_so", "linker_so"):
                command = list(getattr(self.compiler, name))
                setattr(self.compiler, name, ["clang", *command[1:]])
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "gwcore._dedup",
            ["gwcore/_dedup.pyx"],
            include_dirs=["gwcore/includes"],
            extra_compile_args=list(RELEASE_COMPILE_ARGS),
            extra_link_args=list(RELEASE_LINK_ARGS),
        )
    ],
    cmdclass={"build_ext": build_ext},
)
