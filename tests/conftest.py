"""Test set-up: 8 fake CPU devices, and torch imported before TensorFlow."""
import os

import pytest

# Sharding tests need several devices; XLA reads this once, before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# `import tensorflow` followed by `import torchvision` segfaults (TF 2.21, torch 2.14),
# while the other order works: import the torch side first when it is installed.
try:
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError:
    pass


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Returns a fresh TFDS data dir in which the digits dataset gets built once (offline)."""
    return str(tmp_path_factory.mktemp("tensorflow_datasets"))
