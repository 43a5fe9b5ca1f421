"""Lazy TensorFlow import for the input pipeline.

`import vitjax` and `import vitjax.data` must not import TensorFlow (it is slow and
grabs accelerator memory); every function of the pipeline that needs TF calls
`import_tensorflow()` instead.
"""
import functools


@functools.cache
def import_tensorflow():
    """Returns the `tensorflow` module, imported once with accelerators hidden from it."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    # tf.data only runs on the host; without this TF would reserve GPU memory that JAX needs.
    for device_type in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], device_type)
        except (RuntimeError, ValueError):
            pass  # Already initialised by someone else, or no such device type.
    return tf
