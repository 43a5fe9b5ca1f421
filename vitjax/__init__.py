"""vitjax: Vision Transformers in JAX/Flax.

`import vitjax` is light: it imports neither TensorFlow (only `vitjax.data` needs it)
nor PyTorch (only `vitjax.convert` needs it).
"""

__version__ = "0.1.0"
