"""The engine's compiled CPU kernel, ``decode_attention.cpp``, built once per machine the way
DeepSpeed builds its CPU ops: ``torch.utils.cpp_extension`` (g++ and ninja) into torch's extension
cache (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), 10 to 30 s the first
time, a load after that. Compiled for the CPU capability torch itself dispatches to (AVX-512,
AVX2, or the compiler's default), so a cache shared between unlike machines holds one build per
capability. Where it cannot be built (no compiler), or with ``RETRO_RAY_KERNELS=0``, ``KVCache``
attends with per-row SDPA: the same numbers, slower. GPUs always use SDPA. Imports no Ray.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("retro_ray")

BLOCK = 16
"""Positions per block of the blocked key cache the kernel reads ([h_kv, N / BLOCK, e, BLOCK])."""
WIDTHS = (32, 64, 128)
"""Head widths the kernel is compiled for."""
GROUPS = 8
"""The most query heads per key head one call takes (``KVCache`` hands it more in groups)."""

_FLAGS = {"AVX512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma"],
          "AVX2": ["-mavx2", "-mfma"]}


@functools.cache
def decode_attention():
    """``torch.ops.retro_ray.decode_attention`` (q [b, h_kv, g, e], blocked keys, values [h_kv, N, e],
    lo, hi [b], scale -> [b, h_kv, g, e]), built on first use; None where it cannot be."""
    if os.environ.get("RETRO_RAY_KERNELS", "1") == "0":
        return None
    from torch.utils.cpp_extension import load

    capability = torch.backends.cpu.get_cpu_capability()
    try:
        # -ffast-math lets the compiler use glibc's vector exp and reorder the softmax's sums; the
        # library is linked without it, so the process's floating-point modes stay as they are
        load(f"retro_ray_kernels_{capability.lower()}", [str(Path(__file__).with_name("decode_attention.cpp"))],
             extra_cflags=["-O3", "-ffast-math", *_FLAGS.get(capability, [])], is_python_module=False)
    except Exception as e:  # no compiler, no ninja, a read-only cache: the SDPA path still serves
        log.warning("decode attention kernel not built (%s: %s); attending with per-row SDPA",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    return torch.ops.retro_ray.decode_attention
