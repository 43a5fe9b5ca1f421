"""Block reads and writes shared by the Pallas kernels: masked on Triton, plain on Mosaic.

`cfg` is a kernel's static config; only its `masked_io` flag is read (True on the Triton lowering,
where a block may run past the end of an array and must neither read nor write out there).
"""


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
