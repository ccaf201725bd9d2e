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

import os
import runpy
import sys
import sysconfig
import tempfile

from setuptools import setup
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
    # opt_level 3 is mypyc's default; debug_level 0 keeps the wheel small.
    try:
        return list(mypycify(COMPILED_MODULES, opt_level="3", debug_level="0"))
    except SystemExit:  # mypyc's type check failed (it has printed why)
        if mode == "1":
            raise
        sys.stderr.write("trioserve: mypyc failed, building pure Python\n")
        return []


setup(ext_modules=_ext_modules())
