r"""LookupViT-B/16 on ImageNet-1k from scratch (Koner et al. 2024, "LookupViT: Compressing visual information to a
limited number of tokens").

    python -m vitjax.main --config=configs/lookupvit_i1k.py --workdir=/ckpt/lookupvit_b16_10x10
    python -m vitjax.main --config=configs/lookupvit_i1k.py:variant=lookupvit_base_patch16_224_7x7 --workdir=/ckpt/lv7
    python -m vitjax.main --config=configs/lookupvit_i1k.py:multires --workdir=/ckpt/lookupvit_b16_multires
    python -m vitjax.main --config=configs/lookupvit_i1k.py:runlocal --workdir=/tmp/lookupvit_local

Expected result: not stated here. The paper's tables (its ImageNet-1k accuracies and its training recipe) could
not be read from this machine, only its abstract ("2x reduction in FLOPs while upholding or improving
accuracy"); check them before quoting a number. The recipe below is therefore the DeiT recipe that ViT-B/16
baselines train with (Touvron et al. 2021, Table 9), as configs/vit_i1k.py: AdamW (0.9, 0.999), batch 1024,
lr 5e-4 per 512 images, 5 warmup epochs from 1e-6, cosine to 1e-5, weight decay 0.05, drop path 0.1,
300 epochs, RandAugment m9 mstd0.5, mixup 0.8 / cutmix 1.0, label smoothing 0.1, random erasing 0.25,
repeated augmentation x3; eval resize 256, centre crop 224.

`multires` trains one model over the compressed grids 3x3, 5x5, 7x7 and 10x10 (one drawn per step, the
paper's multi-resolution training); evaluate it at any of them with `compressed_grid=(h, w)`.
`runlocal` trains a LookupViT of width 32 (16 px digits, 4 px patches: 4x4 lookup tokens, 2x2 compressed) for
100 steps on a CPU (`runlocal,multires` trains over the 2x2 and 4x4 grids instead).
"""
from vitjax import config_utils

VARIANTS = ("lookupvit_base_patch16_224_3x3", "lookupvit_base_patch16_224_5x5", "lookupvit_base_patch16_224_7x7",
            "lookupvit_base_patch16_224_10x10")
MULTIRES_GRIDS = ((3, 3), (5, 5), (7, 7), (10, 10))


def get_config(arg=None):
    """Returns the LookupViT config; arguments: variant (a registered lookupvit name), multires, data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="lookupvit_base_patch16_224_10x10", multires=False, data_dir="",
                                 runlocal=False, choices=dict(variant=VARIANTS))
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = arg.variant
    config.model = dict(num_classes=1000, drop_path_rate=0.1, dtype="bfloat16")
    if arg.multires:
        config.model.train_grids = MULTIRES_GRIDS
    config.objective = "supervised"

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    config.input = config_utils.imagenet_input(
        data_dir, randaug="randaug(2, 9, magnitude_std=0.5, increasing=True)",
        label_smoothing=0.1, mixup=0.8, cutmix=1.0, random_erasing=0.25, repeated_augmentation=3)

    config.batch_size = 1024
    config.total_epochs = 300.0
    config.optim.name = "adamw"
    config.optim.blr = 2.5e-4  # lr = blr * batch / 256 = 5e-4 * batch / 512
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 5.0
    config.optim.warmup_init_lr = 1e-6
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-5

    config.log_every_steps = 100
    config.eval_every_steps = 2500
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model_name = "lookupvit_base_patch16_224_7x7"
        config.model = dict(num_classes=10, img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2,
                            num_heads=2, compressed_grid=(2, 2), drop_path_rate=0.1)
        if arg.multires:
            config.model.train_grids = ((2, 2), (4, 4))
        config.input = config_utils.digits_input(16, label_smoothing=0.1)
        config_utils.runlocal_schedule(config)
        config.optim.blr = 8e-3  # lr 2e-3 at batch 64
    return config
