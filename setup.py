"""vitjax: Vision Transformers in JAX/Flax.

Requirement floors are the versions the test suite ran with (CI installs the newest that pip resolves,
into a fresh virtual environment): Python 3.11, jax 0.10.2, flax 0.12.8, optax 0.2.8,
orbax-checkpoint 0.12.8, chex 0.1.92, TensorFlow 2.21, TFDS 4.9.10.
"""
from setuptools import find_packages, setup

setup(
    name="vitjax",
    version="0.1.0",
    description="A JAX/Flax research codebase for Vision Transformers.",
    packages=find_packages(include=["vitjax", "vitjax.*"]),
    # CLIP's BPE merges (MIT, see vitjax/text/CLIP_BPE_LICENSE): the tokenizer works offline.
    package_data={"vitjax.text": ["clip_bpe_merges.txt.gz", "CLIP_BPE_LICENSE"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "etils[epath]",           # orbax's path layer; vitjax.checkpoint lists step directories with it
        "ml-collections>=1.1.0",
        "chex>=0.1.92",
        "numpy",
        "absl-py",
        "tqdm",
        "tensorboardX",
        "pillow",
        # The input pipeline: imported lazily, only by vitjax.data.
        "tensorflow-cpu>=2.21; platform_machine=='x86_64'",
        "tensorflow>=2.21; platform_machine!='x86_64'",
        "tensorflow-datasets>=4.9.10",
        # TFDS 4.9 imports it to locate its dataset code but no longer requires it on Python >= 3.9.
        "importlib_resources",
        "scikit-learn",  # ships the bundled offline `digits` dataset
        # vitjax.text's CLIP tokenizer: unicode repair and the \p{L} word split, as open_clip's.
        "ftfy>=6.3.1",
        "regex",
    ],
    extras_require={
        # Weight conversion from PyTorch checkpoints; torch is never imported by `import vitjax`.
        "convert": ["torch", "safetensors"],
        # The notebooks in colabs/ (plots).
        "colab": ["matplotlib"],
        # SigLIP's tokenizer (vitjax.text.tokenizer("sentencepiece", model_file=...)).
        "text": ["sentencepiece>=0.2.3"],
        # `python -m vitjax.aot`: the TPU compiler (libtpu) matching the installed jax, to compile train
        # steps and Pallas kernels for TPU topologies on any host; never imported by `import vitjax`.
        "aot": ["jax[tpu]>=0.10.2"],
        "test": [
            "pytest",
            "pytest-xdist",
            "torch==2.14.1",
            "torchvision==0.29.1",
            "timm==1.0.31",
            "transformers",
            "safetensors",
            "matplotlib",  # tests/test_colabs.py runs the notebooks
            "open_clip_torch==3.3.0",  # CLIP tokenizer and model parity (tests/test_text.py, test_clip_convert.py)
            "sentencepiece>=0.2.3",
            "qwix>=0.1.8",  # real int8 execution, vitjax.quant.int8 (tests/test_quant_int8.py)
        ],
        # vitjax.quant's backend="qwix": Dense matmuls in int8 through Google's qwix.
        "int8": ["qwix>=0.1.8"],
    },
)
