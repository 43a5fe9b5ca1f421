r"""TNT on ImageNet-1k from scratch (Han et al. 2021, "Transformer in Transformer").

    python -m vitjax.main --config=configs/tnt_i1k.py --workdir=/ckpt/tnt_s
    python -m vitjax.main --config=configs/tnt_i1k.py:variant=tnt_b_patch16_224 --workdir=/ckpt/tnt_b
    python -m vitjax.main --config=configs/tnt_i1k.py:runlocal --workdir=/tmp/tnt_local

Expected top-1 on ImageNet val at 224 (paper Table 3): TNT-S 81.5%, TNT-B 82.9%.

The recipe is the paper's Table 2 (DeiT's): AdamW (0.9, 0.999), batch 1024, lr 1e-3, cosine decay after
5 warmup epochs, 300 epochs, weight decay 0.05, dropout 0, stochastic depth 0.1, label smoothing 0.1,
random-resized crop (bicubic) + flip + RandAugment m9 mstd0.5, mixup 0.8 / cutmix 1.0, random erasing 0.25;
inputs normalised with mean = std = 0.5 (timm's TNT config); eval: resize 248 (crop 0.9), centre crop 224.
DeiT's repeated augmentation (3 views of each image), and a model EMA (0.99996, reported as eval_ema/*)
as the official command.
`runlocal` trains a shrunk TNT on the bundled 8x8 digits: 2x2 patches of 4x4 px, each cut into 2x2 "pixels".
"""
from vitjax import config_utils

VARIANTS = ("tnt_s_patch16_224", "tnt_b_patch16_224")


def get_config(arg=None):
    """Returns the TNT config; arguments: variant (tnt_s_patch16_224 | tnt_b_patch16_224), data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="tnt_s_patch16_224", data_dir="", runlocal=False,
                                 choices=dict(variant=VARIANTS))
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = arg.variant
    config.model = dict(num_classes=1000, drop_path_rate=0.1, dtype="bfloat16")
    config.objective = "supervised"

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    # Eval: resize floor(224 / 0.9) = 248 (bicubic), centre crop 224; mean = std = 0.5 as timm's TNT config.
    config.input = config_utils.imagenet_input(
        data_dir, crop_pct=0.9, randaug="randaug(2, 9, magnitude_std=0.5, increasing=True)",
        normalize="normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))",
        label_smoothing=0.1, mixup=0.8, cutmix=1.0, random_erasing=0.25,
        repeated_augmentation=3)

    config.batch_size = 1024
    config.total_epochs = 300.0
    config.optim.name = "adamw"
    config.optim.lr = 1e-3
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 5.0
    config.optim.warmup_init_lr = 1e-6
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-5

    config.ema_decay = 0.99996
    config.log_every_steps = 100
    config.eval_every_steps = 2500
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model_name = "tnt_s_patch16_224"
        config.model = dict(num_classes=10, img_size=8, patch_size=4, first_stride=2, in_chans=1, embed_dim=64,
                            inner_dim=16, depth=2, num_heads_outer=4, num_heads_inner=2, drop_path_rate=0.1)
        # No random shifts: they slow this tiny run down more than its 100 steps allow.
        config.input = config_utils.digits_input(label_smoothing=0.1)
        config_utils.runlocal_schedule(config)
        config.optim.lr = 2e-3
    return config
