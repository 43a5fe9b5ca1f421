r"""MetaFormer models trained from scratch on ImageNet-1k: PoolFormer (Yu et al. 2022, "MetaFormer Is Actually
What You Need for Vision", Sec. 4.1) and PoolFormerV2 / ConvFormer / CAFormer (Yu et al. 2023, "MetaFormer
Baselines for Vision", Sec. 4.1, with the official sail-sg/metaformer training scripts).

    python -m vitjax.main --config=configs/metaformer_i1k.py --workdir=/ckpt/caformer_s18
    python -m vitjax.main --config=configs/metaformer_i1k.py:variant=convformer_s18 --workdir=/ckpt/convformer_s18
    python -m vitjax.main --config=configs/metaformer_i1k.py:runlocal --workdir=/tmp/metaformer_local  # digits, CPU

Expected top-1 on ImageNet val at 224 (`EXPECTED_TOP1`, the papers' Tables): PoolFormer S12 77.2%, S24 80.3%,
S36 81.4%, M36 82.1%, M48 82.5%; PoolFormerV2 S12 78.0%, S24 80.7%, S36 81.6%, M36 82.2%, M48 82.6%;
ConvFormer S18 83.0%, S36 84.1%, M36 84.5%, B36 84.8%; CAFormer S18 83.6%, S36 84.5%, M36 85.2%, B36 85.5%.

The recipe: batch 4096, 300 epochs, weight decay 0.05, cosine to 1e-5 after a warmup from 1e-6; AdamW
(0.9, 0.999) at lr 4e-3 (blr 2.5e-4) for PoolFormer v1/v2 (5 warmup epochs) and ConvFormer (20), LAMB at
lr 8e-3 (blr 5e-4, 20 warmup epochs) for CAFormer; per-model stochastic depth and CAFormer head dropout
(`RECIPES`); random-resized crop (bicubic) + flip + RandAugment (9, 0.5), mixup 0.8, cutmix 1.0, random
erasing 0.25, label smoothing 0.1; eval: resize to 224 / crop_pct (bicubic), centre crop 224, with
timm's crop_pct (PoolFormer S 0.9, M 0.95, the MetaFormer baselines 1.0).

Arguments: variant=any registered MetaFormer name (poolformer_s12 ... caformer_b36); data_dir=PATH (TFDS dir
with imagenet2012); runlocal: the variant shrunk to 4 blocks (32-128 channels) on the bundled digits
upsampled to 32x32 (the total stride), 10 steps of AdamW on a CPU.
"""
from vitjax import config_utils

# variant: (optimizer, lr at batch 4096, warmup epochs, drop path, head dropout, eval crop_pct)
RECIPES = {
    "poolformer_s12": ("adamw", 4e-3, 5, 0.1, 0.0, 0.9),
    "poolformer_s24": ("adamw", 4e-3, 5, 0.1, 0.0, 0.9),
    "poolformer_s36": ("adamw", 4e-3, 5, 0.2, 0.0, 0.9),
    "poolformer_m36": ("adamw", 4e-3, 5, 0.3, 0.0, 0.95),
    "poolformer_m48": ("adamw", 4e-3, 5, 0.4, 0.0, 0.95),
    "poolformerv2_s12": ("adamw", 4e-3, 5, 0.1, 0.0, 1.0),
    "poolformerv2_s24": ("adamw", 4e-3, 5, 0.1, 0.0, 1.0),
    "poolformerv2_s36": ("adamw", 4e-3, 5, 0.2, 0.0, 1.0),
    "poolformerv2_m36": ("adamw", 4e-3, 5, 0.3, 0.0, 1.0),
    "poolformerv2_m48": ("adamw", 4e-3, 5, 0.4, 0.0, 1.0),
    "convformer_s18": ("adamw", 4e-3, 20, 0.2, 0.0, 1.0),
    "convformer_s36": ("adamw", 4e-3, 20, 0.3, 0.0, 1.0),
    "convformer_m36": ("adamw", 4e-3, 20, 0.4, 0.0, 1.0),
    "convformer_b36": ("adamw", 4e-3, 20, 0.6, 0.0, 1.0),
    "caformer_s18": ("lamb", 8e-3, 20, 0.15, 0.0, 1.0),
    "caformer_s36": ("lamb", 8e-3, 20, 0.3, 0.4, 1.0),
    "caformer_m36": ("lamb", 8e-3, 20, 0.4, 0.4, 1.0),
    "caformer_b36": ("lamb", 8e-3, 20, 0.6, 0.5, 1.0),
}
EXPECTED_TOP1 = {
    "poolformer_s12": 77.2, "poolformer_s24": 80.3, "poolformer_s36": 81.4, "poolformer_m36": 82.1,
    "poolformer_m48": 82.5, "poolformerv2_s12": 78.0, "poolformerv2_s24": 80.7, "poolformerv2_s36": 81.6,
    "poolformerv2_m36": 82.2, "poolformerv2_m48": 82.6, "convformer_s18": 83.0, "convformer_s36": 84.1,
    "convformer_m36": 84.5, "convformer_b36": 84.8, "caformer_s18": 83.6, "caformer_s36": 84.5,
    "caformer_m36": 85.2, "caformer_b36": 85.5,
}


def get_config(arg=None):
    """Returns the MetaFormer ImageNet-1k config; see the module docstring for the arguments."""
    arg = config_utils.parse_arg(arg, variant="caformer_s18", runlocal=False, data_dir="",
                                 choices=dict(variant=tuple(RECIPES)))
    optimizer, lr, warmup_epochs, drop_path, head_dropout, crop_pct = RECIPES[arg.variant]
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = arg.variant
    config.model = dict(num_classes=1000, img_size=224, drop_path_rate=drop_path, dtype="bfloat16")
    if head_dropout:
        config.model.head_dropout = head_dropout
    config.objective = "supervised"

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    # Eval as timm's: resize floor(224 / crop_pct) (bicubic), centre crop 224.
    config.input = config_utils.imagenet_input(
        data_dir, crop_pct=crop_pct, randaug="randaug(2, 9, magnitude_std=0.5, increasing=True)",
        label_smoothing=0.1, mixup=0.8, cutmix=1.0, random_erasing=0.25)

    config.batch_size = 4096
    config.total_epochs = 300.0
    config.optim.name = optimizer
    config.optim.blr = lr * 256 / 4096
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = float(warmup_epochs)
    config.optim.warmup_init_lr = 1e-6
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-5

    config.log_every_steps = 100
    config.eval_every_steps = 3130
    config.checkpoint_every_steps = 3130
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model = dict(num_classes=10, img_size=32, in_chans=1, depths=(1, 1, 1, 1), dims=(32, 64, 96, 128),
                            drop_path_rate=0.0)
        # Upsampled to the total stride (32) so every stage keeps at least one pixel.
        config.input = config_utils.digits_input(32, padding=4, label_smoothing=0.0)
        config_utils.runlocal_schedule(config, batch_size=32, total_steps=10, warmup_steps=2, log_every_steps=5)
        config.optim.name = "adamw"  # LAMB's layer-wise trust ratio moves too little in 10 steps
        config.optim.blr = 8e-3  # lr 1e-3 at batch 32
        config.optim.warmup_init_lr = 0.0
        config.optim.min_lr = 0.0
    return config
