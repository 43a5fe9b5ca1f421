"""A user's pp-op module, for tests/test_data_ops.py: `input.pp_modules=("data_ops_plugin",)`."""
import vitjax.data as data
from vitjax.data.ops import import_tensorflow


@data.register_op("invert", kind="deterministic")
@data.image_op
def invert(maximum=255):
    """Returns an op mapping a uint8 image x to maximum - x."""
    if not isinstance(maximum, int) or not 0 < maximum <= 255:
        raise ValueError(f"maximum must be an int in (0, 255], got {maximum!r}")

    def apply(image, seed):
        del seed
        tf = import_tensorflow()
        return tf.cast(maximum, image.dtype) - image
    return apply


@data.register_op("parity", kind="deterministic")
def parity(key="label", outkey="parity"):
    """Returns an op writing field `outkey` = field `key` mod 2 (a label-aware dict op)."""

    def apply(example, seed):
        del seed
        return {**example, outkey: example[key] % 2}
    return apply
