r"""SN-Net v2 on ImageNet-1k: the recipe, its commands and expected results are in configs/snnet_deit.py (this file
gives the family the `<family>_i1k.py` name that tests/test_families_train.py looks for).

    python -m vitjax.main --config=configs/snnet_i1k.py:runlocal --workdir=/tmp/snnet_local
"""
from vitjax import config_utils


def get_config(arg=None):
    """Returns configs/snnet_deit.py's config for the same arguments."""
    return config_utils.load_config("configs/snnet_deit.py" + (f":{arg}" if arg else ""))
