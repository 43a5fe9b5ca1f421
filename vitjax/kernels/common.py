"""What the Pallas kernels (attention, ToMe merge) share: backend and interpret-mode choice, tile
rounding, compiler params per lowering, and the masked block loads and stores.

Two lowerings, one kernel body each:
- "triton" (GPU): arrays stay in the caller's layout; blocks running past an array's end are read and
  written with masked loads and stores (`cfg.masked_io`); tiles are powers of two >= 16.
- "mosaic" (TPU): arrays are zero-padded to whole (8, 128) tiles first, as Mosaic loads cannot be masked.

Interpret mode (the default on a CPU) is the same kernel body, evaluated op by op by XLA instead of
compiled for an accelerator: a numerical check of the kernel, never a fallback and never a speed
measurement. `resolve_backend` logs it once per kernel and process, so a CPU run cannot be mistaken
for a hardware run.
"""
import contextlib
import threading
from typing import Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
from absl import logging
from jax import lax

BACKENDS = ("triton", "mosaic")
# Mosaic vector registers hold (8, 128) fp32 tiles: 8 sublanes by 128 lanes.
SUBLANES, LANES = 8, 128
# Triton's tl.dot needs every matrix dimension >= 16.
MIN_TRITON_TILE = 16
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# The platform each lowering compiles for (jax.default_backend() names).
_BACKEND_PLATFORM = {"triton": "gpu", "mosaic": "tpu"}

_logged_interpret = set()
# Ahead-of-time compilation for another platform (`vitjax.aot`): the kernels decide as if running there.
_target = threading.local()


@contextlib.contextmanager
def target_platform(platform: Optional[str], device_kind: Optional[str] = None,
                    vmem_limit_bytes: Optional[int] = None) -> Iterator[None]:
    """Returns a context in which the kernels and the dispatcher build for `platform` ("tpu", "gpu"), not the host's.

    Used to compile for a TPU topology from a CPU host: inside it the Pallas kernels lower with Mosaic
    (not interpret mode) and "auto" follows that platform's preferences. `device_kind` (e.g. "TPU v5 lite")
    sizes the kernels' VMEM budget; without it the smallest known TPU's is assumed. `vmem_limit_bytes`
    replaces the scoped VMEM limit the Mosaic kernels are compiled with (not the dispatcher's budget): set
    below a kernel's need, the compiler's error states what the kernel uses (`vitjax.aot.mosaic_vmem_used`).
    """
    if platform not in (None, "cpu", "gpu", "tpu"):
        raise ValueError(f"Unknown target platform {platform!r}; valid choices: None, 'cpu', 'gpu', 'tpu'")
    previous = tuple(getattr(_target, name, None) for name in ("platform", "device_kind", "vmem_limit"))
    _target.platform, _target.device_kind, _target.vmem_limit = platform, device_kind, vmem_limit_bytes
    try:
        yield
    finally:
        _target.platform, _target.device_kind, _target.vmem_limit = previous


def platform() -> str:
    """Returns the platform the kernels build for: the `target_platform` in effect, else jax's default backend."""
    return getattr(_target, "platform", None) or jax.default_backend()


# VMEM per TensorCore, as the TPU compiler reports it (libtpu 0.0.42, `experiments/kernel_compile_table.py`:
# "Used X of Y vmem" with vmem_limit_bytes raised past it): v4 16 MiB, v5p 64 MiB, v5e more than 80 MB
# (128 MiB per its docs). The default scoped limit is 16 MiB on v4 and 32 MiB on v5e / v5p.
TPU_VMEM_BYTES = {"TPU v4": 16 * 2**20, "TPU v5": 64 * 2**20, "TPU v5p": 64 * 2**20, "TPU v5 lite": 128 * 2**20,
                  "TPU v5e": 128 * 2**20}
# Room left in VMEM for what a kernel body allocates beyond its double-buffered blocks (Mosaic's internal
# scratch was under 1 MiB in every case of the compile table).
VMEM_HEADROOM = 0.85


def tpu_device_kind() -> Optional[str]:
    """Returns the TPU the kernels build for: the target's device kind, else the attached TPU's, else None."""
    kind = getattr(_target, "device_kind", None)
    if kind is None and jax.default_backend() == "tpu":
        kind = jax.devices()[0].device_kind
    return kind


def tpu_vmem_budget() -> int:
    """Returns the VMEM bytes a Mosaic kernel may use on the target TPU (the smallest known TPU's if unknown)."""
    physical = TPU_VMEM_BYTES.get(tpu_device_kind() or "", min(TPU_VMEM_BYTES.values()))
    return int(physical * VMEM_HEADROOM)


def default_backend() -> str:
    """Returns the lowering for the target platform: "mosaic" on a TPU, else "triton"."""
    return "mosaic" if platform() == "tpu" else "triton"


def resolve_backend(kernel: str, backend: Optional[str], interpret: Optional[bool]) -> Tuple[str, bool]:
    """Returns (backend, interpret) with the defaults filled in; raises when the platform cannot run them.

    backend defaults to the platform's lowering, interpret to True on a CPU (where no lowering
    compiles). Interpret mode is logged once per `kernel` name and process.
    """
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; valid choices: {BACKENDS}")
    target = platform()
    interpret = target == "cpu" if interpret is None else bool(interpret)
    wanted = _BACKEND_PLATFORM[backend]
    # On a CPU host interpret=False is allowed: it serves cross-lowering (`.lower(lowering_platforms=...)`).
    if not interpret and target in _BACKEND_PLATFORM.values() and target != wanted:
        valid = [name for name, lowered_for in _BACKEND_PLATFORM.items() if lowered_for == target]
        raise ValueError(f"{kernel}: backend {backend!r} compiles for a {wanted.upper()}, the platform is "
                         f"{target}; valid choices here: {valid}, or interpret=True")
    if interpret and kernel not in _logged_interpret:
        _logged_interpret.add(kernel)
        logging.warning("%s: Pallas interpret mode on %s (%s-flavoured kernel): the same kernel body evaluated "
                        "op by op by XLA, not a fallback; numerics only, its timings say nothing about a "
                        "GPU or TPU.", kernel, target, backend)
    return backend, interpret


def compiles_for_tpu(backend: Optional[str] = None, interpret: Optional[bool] = None) -> bool:
    """Returns whether a kernel call with these settings (defaults: the target's) is compiled by Mosaic for a TPU."""
    backend = default_backend() if backend is None else backend
    interpret = platform() == "cpu" if interpret is None else bool(interpret)
    return backend == "mosaic" and not interpret


def dtype_unsupported_reason(dtype, backend: Optional[str] = None, interpret: Optional[bool] = None) -> Optional[str]:
    """Returns why the kernels cannot take `dtype` (compiled as `backend` / `interpret` say), or None when they can."""
    if compiles_for_tpu(backend, interpret) and jnp.dtype(dtype) == jnp.float16:
        # Measured: TPU v4, v5e and v5p all fail in Mosaic with "Invalid vector type for load" (no fp16
        # vector loads); bfloat16 is the TPU's half precision.
        return "float16 does not compile for TPUs (Mosaic: 'Invalid vector type for load'); use bfloat16"
    if any(jnp.dtype(dtype) == supported for supported in SUPPORTED_DTYPES):
        return None
    return f"dtype {jnp.dtype(dtype).name} not supported (valid: float32, bfloat16, float16)"


def matmul_precision(dtype):
    """Returns full fp32 matmul precision for fp32 operands (GPU would use TF32, TPU bf16 passes), else None."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def next_power_of_2(n: int) -> int:
    """Returns the smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
    """Returns n rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


def triton_pad(n: int) -> int:
    """Returns the power-of-two extent (>= MIN_TRITON_TILE) a Triton tile covering n rows needs."""
    return max(MIN_TRITON_TILE, next_power_of_2(n))


def check_triton_tile(name: str, value: int) -> int:
    """Returns `value` if it is a valid Triton tile (a power of two >= 16); raises otherwise."""
    if value < MIN_TRITON_TILE or value & (value - 1):
        raise ValueError(f"Triton block sizes must be powers of two >= {MIN_TRITON_TILE}, got {name}={value}")
    return value


def triton_tile(name: str, requested: int, length: int) -> int:
    """Returns the requested power-of-two tile, shrunk to what `length` needs (small N: one small tile)."""
    return min(check_triton_tile(name, requested), triton_pad(length))


def mosaic_tile(name: str, requested: int, length: int, granule: int) -> int:
    """Returns the requested tile (a multiple of `granule`), shrunk to `length` rounded up to `granule`."""
    if requested % granule:
        raise ValueError(f"Mosaic block sizes along this axis must be multiples of {granule}, got {name}={requested}")
    return min(requested, round_up(length, granule))


def compiler_params(backend: str, grid_rank: int, num_warps: Optional[int] = None,
                    num_stages: Optional[int] = None, dimension_semantics: Optional[Tuple[str, ...]] = None):
    """Returns the pallas_call compiler params of a lowering: Triton launch sizes, or Mosaic's grid semantics.

    dimension_semantics (Mosaic) defaults to every axis "parallel"; an axis whose steps accumulate into
    VMEM scratch must be "arbitrary" (run in order on one core).
    """
    if backend == "triton":
        from jax.experimental.pallas import triton as plgpu
        return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    if backend == "mosaic":
        from jax.experimental.pallas import tpu as pltpu
        # The default scoped VMEM limit (32 MiB on v5e / v5p) is below what they have: allow all of it.
        return pltpu.CompilerParams(dimension_semantics=dimension_semantics or ("parallel",) * grid_rank,
                                    vmem_limit_bytes=(getattr(_target, "vmem_limit", None)
                                                      or TPU_VMEM_BYTES.get(tpu_device_kind() or "")))
    raise ValueError(f"Unknown backend {backend!r}; valid choices: {BACKENDS}")


# ------------------------------------------------------------------------------------------------
# Block reads and writes: masked on Triton, plain on Mosaic
# ------------------------------------------------------------------------------------------------
# `cfg` is a kernel's static config; only its `masked_io` flag is read (True on the Triton lowering,
# where a block may run past the end of an array and must neither read nor write out there).

def load(cfg, ref, rows=None, cols=None, mask=None):
    """Returns ref[rows, cols]; on Triton, entries outside `mask` read as 0 and never touch memory."""
    index = (slice(None) if rows is None else rows, slice(None) if cols is None else cols)
    if cfg.masked_io and mask is not None:
        from jax.experimental.pallas import triton as plgpu
        view = ref.at[index] if (rows is not None or cols is not None) else ref
        return plgpu.load(view, mask=mask, other=0)
    # Mosaic arrays are zero-padded to whole tiles, so nothing is out of bounds there.
    return ref[index]


def store(cfg, ref, value, rows=None, cols=None, mask=None):
    """Writes ref[rows, cols] = value; on Triton only the entries inside `mask`."""
    index = (slice(None) if rows is None else rows, slice(None) if cols is None else cols)
    if cfg.masked_io and mask is not None:
        from jax.experimental.pallas import triton as plgpu
        view = ref.at[index] if (rows is not None or cols is not None) else ref
        plgpu.store(view, value, mask=mask)
    else:
        ref[index] = value
