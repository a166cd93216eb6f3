"""Building the package's fused CPU kernels (csrc/*.cpp) on first use, with torch.utils.cpp_extension.

A C++ compiler and ninja are needed; a build takes about half a minute, once: it is cached per torch
version and per source text (build_directory). Where a kernel cannot be built, build() warns once and
returns None, and its op runs its PyTorch path, which is also the reference the tests compare the
kernel with. GATELOOP_FUSED=0 in the environment switches every kernel off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

CSRC = Path(__file__).parent / "csrc"


def build_directory(source: Path, native: bool = False) -> Path:
    """Where a kernel is cached: $GATELOOP_CACHE (default ~/.cache/gateloop), per torch version and per
    source text (the file's and every header beside it), so that upgrading torch or editing the kernel
    or a header it includes rebuilds it, and two checkouts with different sources do not rebuild each
    other's; a kernel built for this CPU's instruction set also per CPU, so that a cache shared by
    machines of a cluster never runs one CPU's build on another."""
    root = Path(os.environ.get("GATELOOP_CACHE", Path.home() / ".cache" / "gateloop"))
    headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # what it may #include
    key = source.read_bytes() + headers + (_cpu_identity().encode() if native else b"")
    digest = hashlib.sha256(key).hexdigest()[:12]
    return root / "kernels" / f"torch-{torch.__version__}-{digest}"


def _cpu_identity() -> str:
    """The CPU's model and instruction-set flags (Linux), else what the platform module says."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines()[:40] if ":" in line)
        return " ".join(fields.get(k, "").strip() for k in ("model name", "flags"))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def build(name: str, source: Path, what: str, native: bool = False) -> ModuleType | None:
    """The compiled module, or None (with one warning saying why) where it cannot be built. native:
    for this CPU's instruction set (-march=native: AVX2 and FMA where the CPU has them; the build
    happens on the machine that runs it). Callers cache the result (functools.cache), so the attempt
    is made once per process."""
    try:
        from torch.utils.cpp_extension import load

        where = build_directory(source, native)
        so = where / f"{name}.so"
        if so.exists():  # the directory is keyed by everything the build depends on: it is current
            return _import(name, so)
        # Build in a private directory, then move the library into place in one rename: a process
        # killed mid-build (a SIGKILLed grid job) leaves no half-written library and no held lock
        # (torch's build lock would make every later process wait for it forever).
        where.parent.mkdir(parents=True, exist_ok=True)
        print(f"gateloop: compiling the fused CPU {what} into {where} (once, about 30 s)", file=sys.stderr,
              flush=True)
        scratch = Path(tempfile.mkdtemp(prefix=where.name + ".build-", dir=where.parent))
        try:
            flags = ["-O3"] + (["-march=native"] if native else [])
            module = load(name, [str(source)], extra_cflags=flags, build_directory=str(scratch), verbose=False)
            where.mkdir(exist_ok=True)
            os.replace(scratch / f"{name}.so", so)
            return module
        finally:  # built or failed, the scratch directory goes (a kill leaves it: it is never read)
            shutil.rmtree(scratch, ignore_errors=True)
    except Exception as e:  # noqa: BLE001  no compiler, no ninja, a read-only cache: use PyTorch
        reason = next(iter(str(e).strip().splitlines()), type(e).__name__)[:200]
        warnings.warn(f"gateloop: the fused CPU {what} could not be built ({reason}); using the PyTorch "
                      "path (set GATELOOP_FUSED=0 to skip the attempt)", RuntimeWarning, stacklevel=4)
        return None


def _import(name: str, so: Path) -> ModuleType:
    """The extension module in the library so, imported directly (no build step, no lock)."""
    spec = importlib.util.spec_from_file_location(name, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fused_allowed(x: Tensor) -> bool:
    """Whether a fused CPU kernel may take x: a CPU tensor, and GATELOOP_FUSED is not 0."""
    return x.device.type == "cpu" and os.environ.get("GATELOOP_FUSED", "1") != "0"
