"""The fused CPU ops of one LSTM step (``csrc/lstm_cell.cpp``), built on first use.

``available()`` compiles the C++ source once per machine with torch's JIT extension builder
(about 10 s; cached in ``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) and
registers ``torch.ops.palgan.lstm_step_forward`` / ``lstm_step_backward``, which the TorchScript
loops of ``models/lstm_fused.py`` call once per step. Without a C++ compiler or ninja (or with
``PALGAN_LSTM_KERNELS=0``) it returns False, warning once unless switched off, and the fused
layer keeps its pointwise blocks in TorchScript ops: same results, slower.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "lstm_cell.cpp"
ENV_SWITCH = "PALGAN_LSTM_KERNELS"

# Vector instructions for the build, by what this CPU runs; the extension's name carries the
# level, so a cache shared by machines of different levels keeps one build for each.
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma",
               "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2", "-mfma"],
}
# -fno-trapping-math lets GCC vectorise the NaN-preserving clamps (it changes no result).
# -fopenmp: at::parallel_for splits the batch over torch's threads; on Linux the extension then
# binds to the libgomp.so.1 torch has already loaded, so there is one OpenMP runtime.
CFLAGS = ["-O3", "-fno-trapping-math"]
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []

_loaded: bool | None = None


def cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def put_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the pip package's binary is not on it unless the
    virtual environment is activated."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])


def build_and_load() -> None:
    from torch.utils.cpp_extension import load   # imported late: it logs about CUDA on import

    put_ninja_on_path()
    capability = cpu_capability()
    load(name=f"palgan_lstm_cell_{capability.lower()}", sources=[str(SOURCE)],
         extra_cflags=CFLAGS + OPENMP_FLAGS + ISA_FLAGS.get(capability, []), extra_ldflags=OPENMP_FLAGS,
         is_python_module=False, verbose=False)


def available() -> bool:
    """Whether ``torch.ops.palgan.lstm_cell_*`` exist in this process (built or loaded on first call)."""
    global _loaded
    if _loaded is None:
        _loaded = False
        if os.environ.get(ENV_SWITCH, "1") == "0":
            return False
        cpp_log = logging.getLogger("torch.utils.cpp_extension")
        level = cpp_log.level
        cpp_log.setLevel(logging.ERROR)     # "No CUDA runtime is found": true, and beside the point
        try:
            build_and_load()
            _loaded = True
        except Exception as err:            # no compiler, no ninja, read-only cache, ...
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            warnings.warn(f"palgan: the C++ LSTM kernels could not be built ({reason}); the fused LSTM "
                          f"runs its pointwise steps in TorchScript instead (same results, slower). "
                          f"Install a C++ compiler and ninja, or set {ENV_SWITCH}=0 to skip the build.",
                          RuntimeWarning, stacklevel=2)
        finally:
            cpp_log.setLevel(level)
    return _loaded
