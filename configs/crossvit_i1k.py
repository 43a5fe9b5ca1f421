r"""CrossViT on ImageNet-1k from scratch (Chen et al. 2021, "CrossViT: Cross-Attention Multi-Scale ViT").

    python -m vitjax.main --config=configs/crossvit_i1k.py --workdir=/ckpt/crossvit_9_dagger
    python -m vitjax.main --config=configs/crossvit_i1k.py:variant=crossvit_18_240 --workdir=/ckpt/crossvit_18
    python -m vitjax.main --config=configs/crossvit_i1k.py:runlocal --workdir=/tmp/crossvit_local

Expected top-1 on ImageNet val (paper Table 3; timm's `_240` names, input 240, the 16-patch branch at 224):
Ti 73.4%, S 81.0%, B 82.2%, 9 73.9%, 15 81.5%, 18 82.5%, 9-dagger 77.1%, 15-dagger 82.3%, 18-dagger 82.8%.

The recipe is DeiT's, as the official main.py: AdamW (0.9, 0.999), total batch 4096, lr 5e-4 x batch / 512
= 4e-3, cosine to 1e-5 after 30 warmup epochs (paper Sec. 4.1; from 1e-6), 300 epochs, weight decay 0.05,
drop path 0.1, random-resized crop 240 (bicubic) + flip + RandAugment m9 mstd0.5, mixup 0.8 / cutmix 1.0,
label smoothing 0.1, random erasing 0.25; eval: resize 274 (crop ratio 256/224), centre crop 240.
DeiT's repeated augmentation (3 views of each image).
`runlocal` trains a shrunk CrossViT on the bundled digits at 16 px (branch 2 bicubic-resized to 12 px).
"""
from vitjax import config_utils

VARIANTS = ("crossvit_tiny_240", "crossvit_small_240", "crossvit_base_240", "crossvit_9_240", "crossvit_15_240",
            "crossvit_18_240", "crossvit_9_dagger_240", "crossvit_15_dagger_240", "crossvit_18_dagger_240")


def get_config(arg=None):
    """Returns the CrossViT config; arguments: variant (a timm `crossvit_*_240` name), data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="crossvit_9_dagger_240", data_dir="", runlocal=False,
                                 choices=dict(variant=VARIANTS))
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = arg.variant
    config.model = dict(num_classes=1000, drop_path_rate=0.1, dtype="bfloat16")
    config.objective = "supervised"

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    # Input 240; eval: resize floor(240 / 0.875) = 274 (bicubic), centre crop 240.
    config.input = config_utils.imagenet_input(
        data_dir, image_size=240, crop_pct=0.875, randaug="randaug(2, 9, magnitude_std=0.5, increasing=True)",
        label_smoothing=0.1, mixup=0.8, cutmix=1.0, random_erasing=0.25,
        repeated_augmentation=3)

    config.batch_size = 4096
    config.total_epochs = 300.0
    config.optim.name = "adamw"
    config.optim.blr = 2.5e-4  # lr = blr * batch / 256 = 5e-4 * batch / 512
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 30.0
    config.optim.warmup_init_lr = 1e-6
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-5

    config.log_every_steps = 100
    config.eval_every_steps = 2500
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model_name = "crossvit_tiny_240"
        config.model = dict(num_classes=10, img_size=16, img_scale=(1.0, 0.75), patch_size=(2, 4), in_chans=1,
                            embed_dim=(32, 64), num_heads=(2, 4), depth=((1, 2, 0),), drop_path_rate=0.1)
        # No random shifts: they slow this tiny run down more than its 100 steps allow.
        config.input = config_utils.digits_input(16, label_smoothing=0.1)
        config_utils.runlocal_schedule(config)
        config.optim.blr = 8e-3  # lr 2e-3 at batch 64
    return config
