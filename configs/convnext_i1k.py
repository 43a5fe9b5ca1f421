r"""ConvNeXt trained from scratch on ImageNet-1k (Liu et al. 2022, "A ConvNet for the 2020s", Appendix A.1).

    python -m vitjax.main --config=configs/convnext_i1k.py --workdir=/ckpt/convnext_tiny
    python -m vitjax.main --config=configs/convnext_i1k.py:variant=convnext_base --workdir=/ckpt/convnext_base
    python -m vitjax.main --config=configs/convnext_i1k.py:runlocal --workdir=/tmp/convnext_local   # digits, CPU

Expected top-1 on ImageNet val at 224 (paper Table 1, ImageNet-1k trained): ConvNeXt-T 82.1%, S 83.1%,
B 83.8%, L 84.3%. One epoch is 313 steps of 4096 images.

The recipe (paper Table 5): AdamW (0.9, 0.999), lr 4e-3 at batch 4096 (blr 2.5e-4), weight decay 0.05,
300 epochs, 20 warmup epochs then cosine to 1e-6, stochastic depth T 0.1 / S 0.4 / B 0.5 / L 0.5, layer
scale init 1e-6, head init scale 1.0, random-resized crop (bicubic) + flip + RandAugment (9, 0.5), mixup 0.8,
cutmix 1.0, random erasing 0.25, label smoothing 0.1; eval: resize 256 (bicubic), centre crop 224.
As the official runs, an EMA of the weights is kept (decay 0.9999); evaluations report it as
eval_ema/* beside eval/*. The figures above are those of the paper.

Arguments: variant=convnext_tiny | convnext_small | convnext_base | convnext_large (any registered
ConvNeXt name with `drop_path=...`); drop_path=RATE overrides the paper's; data_dir=PATH (TFDS dir with
imagenet2012); runlocal: the variant shrunk to 4 blocks (16-64 channels) on the bundled digits upsampled
to 32x32 (ConvNeXt's total stride), 10 steps on a CPU.
"""
from vitjax import config_utils

# Stochastic depth of the paper's ImageNet-1k runs (Table 5); timm's atto...nano are trained with 0.1 or less.
PAPER_DROP_PATH = {"convnext_tiny": 0.1, "convnext_small": 0.4, "convnext_base": 0.5, "convnext_large": 0.5}


def get_config(arg=None):
    """Returns the ConvNeXt ImageNet-1k config; see the module docstring for the arguments."""
    from vitjax import models
    arg = config_utils.parse_arg(arg, variant="convnext_tiny", drop_path=-1.0, runlocal=False, data_dir="",
                                 choices=dict(variant=tuple(models.list_models("convnext"))))
    drop_path = arg.drop_path if arg.drop_path >= 0 else PAPER_DROP_PATH.get(arg.variant, 0.1)
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = arg.variant
    config.model = dict(num_classes=1000, img_size=224, drop_path_rate=drop_path, dtype="bfloat16")
    config.objective = "supervised"

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    # timm's create_transform(is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic")
    # and DeiT's regularisation; eval: resize 256 (bicubic), centre crop 224.
    config.input = config_utils.imagenet_input(
        data_dir, randaug="randaug(2, 9, magnitude_std=0.5, increasing=True)",
        label_smoothing=0.1, mixup=0.8, cutmix=1.0, random_erasing=0.25)

    config.batch_size = 4096
    config.total_epochs = 300.0
    config.optim.name = "adamw"
    config.optim.blr = 2.5e-4  # lr = 4e-3 at batch 4096
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 20.0
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-6
    # Layer scale (`gamma`) and GRN parameters are 1-D: never decayed, as in the official code.

    config.ema_decay = 0.9999
    config.log_every_steps = 100
    config.eval_every_steps = 3130
    config.checkpoint_every_steps = 3130
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model = dict(num_classes=10, img_size=32, in_chans=1, depths=(1, 1, 1, 1), dims=(16, 32, 48, 64),
                            drop_path_rate=0.0)
        # Upsampled to ConvNeXt's total stride (32) so every stage keeps at least one pixel.
        config.input = config_utils.digits_input(32, padding=4, label_smoothing=0.0)
        config_utils.runlocal_schedule(config, batch_size=32, total_steps=10, warmup_steps=2, log_every_steps=5)
        config.optim.blr = 8e-3  # lr 1e-3 at batch 32
        config.optim.min_lr = 0.0
    return config
