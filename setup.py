"""vitjax: Vision Transformers in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="vitjax",
    version="0.1.0",
    description="A JAX/Flax research codebase for Vision Transformers.",
    packages=find_packages(include=["vitjax", "vitjax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=0.1.1",
        "chex>=0.1.87",
        "numpy",
        "absl-py",
        "tqdm",
        "tensorboardX",
        "pillow",
        # The input pipeline: imported lazily, only by vitjax.data.
        "tensorflow-cpu>=2.16; platform_machine=='x86_64'",
        "tensorflow>=2.16; platform_machine!='x86_64'",
        "tensorflow-datasets>=4.9",
        # TFDS 4.9 imports it to locate its dataset code but no longer requires it on Python >= 3.9.
        "importlib_resources",
        "scikit-learn",  # ships the bundled offline `digits` dataset
    ],
    extras_require={
        # Weight conversion from PyTorch checkpoints; torch is never imported by `import vitjax`.
        "convert": ["torch", "safetensors"],
        "test": [
            "pytest",
            "pytest-xdist",
            "torch==2.14.1",
            "torchvision==0.29.1",
            "timm==1.0.31",
            "transformers",
            "safetensors",
        ],
    },
)
