r"""Swin Transformer v1 trained from scratch on ImageNet-1k (Liu et al. 2021, Sec. 4.1 and Appendix A2.1).

    python -m vitjax.main --config=configs/swin_i1k.py --workdir=/ckpt/swin_t
    python -m vitjax.main --config=configs/swin_i1k.py:variant=base --workdir=/ckpt/swin_b
    python -m vitjax.main --config=configs/swin_i1k.py:runlocal --workdir=/tmp/swin_local

Expected top-1 on ImageNet val at 224 (paper Table 1(a)): Swin-T 81.3%, Swin-S 83.0%, Swin-B 83.5%.

The recipe: AdamW (0.9, 0.999), 300 epochs, batch 1024, lr 1e-3 (blr 2.5e-4; the official code scales
5e-4 per 512 images), 20 linear warmup epochs from 1e-6, cosine to 1e-5, weight decay 0.05 (not on
norms, biases and the relative position bias tables), gradient-norm clip 5.0, stochastic depth 0.2 / 0.3 /
0.5 for T / S / B. Augmentation as DeiT: random-resized crop (bicubic) + flip + RandAugment (m9, mstd 0.5),
mixup 0.8 / cutmix 1.0, label smoothing 0.1, random erasing 0.25; no repeated augmentation, no EMA.
Eval: resize 256 (bicubic), centre crop 224.

`runlocal` trains a shrunk Swin-T (width 32, two stages, 2x2 patches, windows of 2) on the bundled 8x8
digits in seconds on a CPU.
"""
from vitjax import config_utils

PAPER = {
    "tiny": dict(model_name="swin_tiny_patch4_window7_224", drop_path_rate=0.2),
    "small": dict(model_name="swin_small_patch4_window7_224", drop_path_rate=0.3),
    "base": dict(model_name="swin_base_patch4_window7_224", drop_path_rate=0.5),
}


def get_config(arg=None):
    """Returns the Swin ImageNet-1k config; arguments: variant (tiny|small|base), data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="tiny", runlocal=False, data_dir="", choices=dict(variant=tuple(PAPER)))
    recipe = PAPER[arg.variant]
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = recipe["model_name"]
    config.model = dict(num_classes=1000, drop_path_rate=recipe["drop_path_rate"], dtype="bfloat16")
    config.objective = "supervised"

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    # timm's create_transform(is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic")
    # and DeiT's regularisation; eval: resize 256 (bicubic), centre crop 224.
    config.input = config_utils.imagenet_input(
        data_dir, randaug="randaug(2, 9, magnitude_std=0.5, increasing=True)",
        label_smoothing=0.1, mixup=0.8, cutmix=1.0, random_erasing=0.25)

    config.batch_size = 1024
    config.total_epochs = 300.0
    config.optim.name = "adamw"
    config.optim.blr = 2.5e-4  # lr = 1e-3 at batch 1024
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 20.0
    config.optim.warmup_init_lr = 1e-6
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-5
    config.optim.clip_grad_norm = 5.0

    config.log_every_steps = 100
    config.eval_every_steps = 2500
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model = dict(num_classes=10, img_size=8, in_chans=1, patch_size=2, embed_dim=32, depths=(2, 2),
                            num_heads=(2, 4), window_size=2)
        config.input = config_utils.digits_input(padding=1, label_smoothing=0.1)
        config_utils.runlocal_schedule(config)
        config.optim.blr = 5e-3  # lr 1.25e-3 at batch 64
        config.optim.warmup_init_lr = 0.0
        config.optim.min_lr = 0.0
    return config
