r"""Hyena N-D DeiT on ImageNet-1k from scratch (Zimerman & Wolf, AISTATS 2024, "Multi-Dimensional Hyena for Spatial
Inductive Bias"), the official Itamarzimm/HyenaND `main.py` recipe (DeiT's).

    python -m vitjax.main --config=configs/hyena_nd_i1k.py --workdir=/ckpt/hyena2d_deit_tiny
    python -m vitjax.main --config=configs/hyena_nd_i1k.py:variant=hyena2dattn_deit_small_patch16_224 --workdir=...
    python -m vitjax.main --config=configs/hyena_nd_i1k.py:runlocal --workdir=/tmp/hyena_nd_local

Expected result: none to quote for ImageNet-1k. The official README trains on CelebA (`--data-set CELEB --bce-loss
--epochs 20`) and the paper reports small-data benchmarks; this config is `main.py`'s DeiT ImageNet default, unmeasured
here.

The recipe is `main.py`'s defaults (DeiT's): AdamW, lr 5e-4 * batch / 512 (1e-3 at batch 1024), 5 warmup epochs,
cosine to 1e-5, 300 epochs, weight decay 0.05, no gradient clipping, drop path 0.1, model EMA 0.99996, repeated
augmentation x3, RandAugment m9 mstd0.5 inc1, mixup 0.8 / cutmix 1.0, label smoothing 0.1, random erasing 0.25; the
model as the README (`--hyena2d_filter --directional_mode seq`, order 2, filter MLP width 64).
`runlocal` trains a width-16 hybrid (method onebyone: a Hyena block, then an attention block; 32 px digits as a 4x4
token map) on a CPU.
"""
from vitjax import config_utils

VARIANTS = tuple(f"{method}_deit_{size}_patch16_224" for method in ("hyena2d", "hyena2dattn")
                 for size in ("tiny", "small", "base"))


def get_config(arg=None):
    """Returns the Hyena N-D config; arguments: variant (a registered hyena2d* name), data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="hyena2d_deit_tiny_patch16_224", data_dir="", runlocal=False,
                                 choices=dict(variant=VARIANTS))
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = arg.variant
    config.model = dict(num_classes=1000, drop_path_rate=0.1, dtype="bfloat16")
    config.objective = "supervised"

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    config.input = config_utils.imagenet_input(
        data_dir, randaug="randaug(2, 9, magnitude_std=0.5, increasing=True)", label_smoothing=0.1, mixup=0.8,
        cutmix=1.0, random_erasing=0.25, repeated_augmentation=3)

    config.batch_size = 1024
    config.total_epochs = 300.0
    config.optim.name = "adamw"
    config.optim.blr = 5e-4 * 256 / 512  # lr = blr * batch / 256 = 1e-3 at batch 1024 (the official / 512 rule)
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 5.0
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-5
    config.ema_decay = 0.99996

    config.log_every_steps = 100
    config.eval_every_steps = 2500
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model_name = "hyena2dattn_deit_tiny_patch16_224"
        config.model = dict(num_classes=10, img_size=32, patch_size=8, in_chans=1, embed_dim=16, depth=2,
                            num_heads=2, filter_order=8, method="onebyone", drop_path_rate=0.1)
        config.input = config_utils.digits_input(32, label_smoothing=0.1)
        config_utils.runlocal_schedule(config)
        config.ema_decay = 0.0
        config.optim.blr = 8e-3  # lr 2e-3 at batch 64
    return config
