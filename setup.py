"""Build script for fastpeft and its compiled extension ``fastpeft._C``.

Environment:
  FASTPEFT_NO_EXT=1         install pure Python (no compiled kernels)
  FASTPEFT_NO_CUDA=1        build only the C++ CPU kernels even with a CUDA torch
  FASTPEFT_CUDA_ARCHS       CUDA compute capabilities, ';'-separated (default "80;90")
  FASTPEFT_REQUIRE_EXT=1    fail the install if the extension cannot be built
  MAX_JOBS                  parallel compile jobs (torch's ninja builder)

Build with ``pip install --no-build-isolation -e .`` so the extension is
compiled against the torch you run.  Without a compiler (or without torch in the
build environment) the install still succeeds, pure Python, with a message.
"""
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


def _say(msg):
    print(f"fastpeft setup: {msg}", file=sys.stderr, flush=True)


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_archs():
    archs = [a.strip() for a in os.environ.get("FASTPEFT_CUDA_ARCHS", "80;90").replace(",", ";").split(";")]
    archs = [a for a in archs if a]
    for a in archs:
        if not a.isdigit():
            raise SystemExit(f"FASTPEFT_CUDA_ARCHS: expected numbers like '80;90', got {a!r}")
    return archs


def _extensions():
    """(ext_modules, cmdclass, metadata); empty when no extension is to be built."""
    if _flag("FASTPEFT_NO_EXT"):
        _say("FASTPEFT_NO_EXT is set: installing pure Python, no compiled kernels")
        return [], {}, None
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # noqa: BLE001 - any failure means: no extension
        _say(f"torch is not importable in the build environment ({e}); installing pure Python. "
             "Use `pip install --no-build-isolation` to compile the kernels against your torch.")
        return [], {}, None

    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
    with_cuda = (torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc)
                 and not _flag("FASTPEFT_NO_CUDA"))
    if torch.version.cuda is None:
        _say("torch is a CPU build: compiling C++ CPU kernels only")
    elif not with_cuda:
        _say("CUDA kernels skipped (nvcc not found or FASTPEFT_NO_CUDA set): C++ CPU kernels only")

    cxx = ["-O3", "-std=c++17", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    sources = ["csrc/common/module.cpp"] + _sources("csrc/*/*_binding.cpp") + _sources("csrc/*/*_cpu.cpp")
    archs = _cuda_archs() if with_cuda else []
    if with_cuda:
        sources += _sources("csrc/*/*_cuda.cu")
        nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        for a in archs:
            nvcc_flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        ext = cpp_extension.CUDAExtension(
            "fastpeft._C", sources, define_macros=[("FASTPEFT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("fastpeft._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=["-fopenmp"])

    meta = {
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if with_cuda else None,
        "with_cuda": with_cuda,
        "cuda_archs": archs,
        "compiler": _compiler_version(),
        "nvcc": _run([nvcc, "--version"]).splitlines()[-1] if with_cuda else None,
        "python": platform.python_version(),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

    class BuildExt(cpp_extension.BuildExtension):
        """torch's builder, plus: optional failure and metadata beside the library."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001
                if _flag("FASTPEFT_REQUIRE_EXT"):
                    raise
                _say(f"building the extension failed ({type(e).__name__}: {e}).\n"
                     "  Installing pure Python instead; fastpeft will use its PyTorch/Triton fallbacks.\n"
                     "  Set FASTPEFT_REQUIRE_EXT=1 to make this an error.")
                self.extensions = []
                return
            for e in self.extensions:
                built = self.get_ext_fullpath(e.name)
                targets = {os.path.dirname(built)}
                if self.inplace:
                    targets.add(os.path.join(ROOT, "fastpeft"))
                for d in targets:
                    if os.path.isdir(d):
                        with open(os.path.join(d, "_C_meta.json"), "w") as f:
                            json.dump(meta, f, indent=1)

        def get_outputs(self):
            return [] if not self.extensions else super().get_outputs()

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}, meta


def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def _compiler_version():
    cxx = os.environ.get("CXX", "c++")
    return _run([cxx, "--version"]).splitlines()[0] if _run([cxx, "--version"]) else cxx


ext_modules, cmdclass, _ = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
