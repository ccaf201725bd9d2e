"""Build trioserve, compiling its hot path with mypyc when it can.

Everything but the extension modules is declared in ``pyproject.toml``; this file only
adds ``ext_modules``. The modules compiled are ``trioserve.compiled.COMPILED_MODULES``:
the request path (the sans-IO protocol layer, then the connection code that runs per
request). mypyc turns each into a C extension module next to its ``.py`` source, and the
package behaves the same either way (the whole test suite runs on both builds:
``make test``).

Whether to compile, chosen by ``TRIOSERVE_COMPILE``:

* unset or ``auto``: compile when mypyc can be imported and a C compiler works, else
  build the pure-Python package (with a note on stderr);
* ``1``: compile, and fail the build if that is not possible;
* ``0``: never compile (the pure-Python package, e.g. to debug with pdb in the hot path).

An editable install (``pip install -e``) is never compiled: extension modules next to the
sources would shadow every edit of them.

mypyc ships with mypy, which ``[build-system] requires`` lists: a plain ``pip install .``
(an isolated build) then has mypyc, and compiles wherever a C compiler works, as a user
expects of a checkout. The compiler is the one thing a build environment cannot install,
hence the probe and the fallback. A build without isolation (``--no-build-isolation``,
what ``make`` does for ``.venv-compiled``: it reuses the venv's mypy and the ``build/``
directory) falls back as well when mypy is missing. (The alternative, a try-import of an
optional mypy, would have made ``pip install .`` pure unless the user knew to pass
``--no-build-isolation``.)
"""

from __future__ import annotations

import importlib.machinery
import os
import runpy
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.errors import CCompilerError, CompileError

# The modules to compile, as trioserve.compiled lists them (read without importing the
# package: its dependencies need not be installed at build time).
COMPILED_MODULES = [
    name.replace(".", "/") + ".py"
    for name in runpy.run_path("trioserve/compiled.py")["COMPILED_MODULES"]
]


# The setuptools commands that build extension modules (pip's build_wheel hook runs
# bdist_wheel; its metadata hooks run egg_info and dist_info, which need none).
_BUILDS_EXTENSIONS = {"bdist_wheel", "build", "build_ext", "install", "develop"}


def _compiler_works() -> bool:
    """Whether the C compiler distutils would use can build a trivial extension."""
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write("#include <Python.h>\nint probe(void) { return 0; }\n")
        try:
            compiler.compile([source], output_dir=tmp, include_dirs=[sysconfig.get_path("include")])
        except (CCompilerError, CompileError, OSError):
            return False
    return True


def _ext_modules() -> list[object]:
    """The mypyc extension modules to build, or none for the pure package."""
    mode = os.environ.get("TRIOSERVE_COMPILE", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"TRIOSERVE_COMPILE must be 0, 1 or auto, not {mode!r}")
    if mode == "0":
        return []
    commands = set(sys.argv[1:])
    if "editable_wheel" in commands:
        # pip install -e: extension modules next to the sources would shadow every later
        # edit of them.
        if mode == "1":
            raise SystemExit("TRIOSERVE_COMPILE=1: an editable install is never compiled")
        return []
    if not commands & _BUILDS_EXTENSIONS:
        return []  # (metadata only: pip's first hooks need no C code generated)
    try:
        from mypyc.build import mypycify
    except ImportError:
        if mode == "1":
            raise SystemExit("TRIOSERVE_COMPILE=1 needs mypyc: pip install mypy") from None
        sys.stderr.write("trioserve: mypyc not installed, building pure Python\n")
        return []
    if not _compiler_works():
        if mode == "1":
            raise SystemExit("TRIOSERVE_COMPILE=1 needs a working C compiler")
        sys.stderr.write("trioserve: no working C compiler, building pure Python\n")
        return []
    # opt_level 3 is mypyc's default; debug_level 0 keeps the wheel small. multi_file: a C
    # file per module (plus mypyc's runtime files) instead of one, which the C compiler
    # takes one per core (ParallelBuildExt).
    try:
        return list(mypycify(COMPILED_MODULES, opt_level="3", debug_level="0", multi_file=True))
    except SystemExit:  # mypyc's type check failed (it has printed why)
        if mode == "1":
            raise
        sys.stderr.write("trioserve: mypyc failed, building pure Python\n")
        return []


class FreshBuildPy(build_py):
    """``build_py`` that first removes the extension modules an earlier build left in
    ``build/lib``: pip builds in the checkout's ``build/`` and the wheel takes all that is
    there, so a pure build after a compiled one (or a module taken off the compiled list)
    would ship stale compiled modules, shadowing their sources."""

    def run(self) -> None:
        suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
        lib = Path(self.build_lib)
        for path in [*lib.glob("*__mypyc.*"), *lib.glob("trioserve/**/*")]:
            if path.name.endswith(suffixes):
                path.unlink()
        super().run()


class ParallelBuildExt(build_ext):
    """``build_ext`` that compiles an extension's C files on every core at once.

    mypyc puts all the compiled modules in one extension (their shared library), whose C
    files distutils compiles one after the other: on one core, most of the build's time.
    Each file is compiled by a ``cc`` child process, so threads suffice to run them side
    by side. A compiler class that compiles in its own way (MSVC) keeps doing so.
    """

    def build_extension(self, ext: Any) -> None:
        compiler = self.compiler
        if _compiles_by_base_loop(type(compiler)):
            compiler.compile = _parallel_compile.__get__(compiler)
        super().build_extension(ext)


def _parallel_compile(
    compiler: Any,
    sources: list[str],
    output_dir: str | None = None,
    macros: Any = None,
    include_dirs: Any = None,
    debug: bool = False,
    extra_preargs: Any = None,
    extra_postargs: Any = None,
    depends: Any = None,
) -> list[str]:
    """``CCompiler.compile`` with its loop over the sources run on a thread per core."""
    macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
        output_dir, macros, include_dirs, sources, depends, extra_postargs
    )
    cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)

    def one(obj: str) -> None:
        src, ext = build[obj]
        compiler._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

    # Largest first: the biggest module is the one that bounds the build's time.
    todo = sorted(
        (obj for obj in objects if obj in build),
        key=lambda obj: os.path.getsize(build[obj][0]),
        reverse=True,
    )
    with ThreadPoolExecutor(_cores()) as pool:
        list(pool.map(one, todo))  # (list(): a failed compile raises here)
    return objects


def _cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):  # (Linux)
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _compiles_by_base_loop(cls: type) -> bool:
    """Whether a compiler class compiles by distutils' base ``compile`` (a loop over
    ``_compile``) rather than by its own (MSVC)."""
    owner = next(base for base in cls.__mro__ if "compile" in vars(base))
    return "_setup_compile" in vars(owner) and hasattr(cls, "_compile")


setup(
    ext_modules=_ext_modules(),
    cmdclass={"build_py": FreshBuildPy, "build_ext": ParallelBuildExt},
)
