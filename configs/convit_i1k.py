r"""ConViT trained from scratch on ImageNet-1k (d'Ascoli et al. 2021, Sec. 3, with DeiT's recipe).

    python -m vitjax.main --config=configs/convit_i1k.py --workdir=/ckpt/convit_tiny
    python -m vitjax.main --config=configs/convit_i1k.py:variant=convit_base --workdir=/ckpt/convit_base
    python -m vitjax.main --config=configs/convit_i1k.py:runlocal --workdir=/tmp/convit_local   # digits, CPU

Expected top-1 on ImageNet val at 224 (paper Table 1): ConViT-Ti 73.1%, ConViT-S 81.3%, ConViT-B 82.4%.
One epoch is 1,251 steps of 1024 images.

The recipe (DeiT's, as the official code): AdamW (0.9, 0.999), lr 5e-4 x batch / 512 (blr 2.5e-4), batch 1024,
weight decay 0.05, 300 epochs, 5 warmup epochs from 1e-6 then cosine to 1e-5, stochastic depth 0.1,
10 GPSA blocks (locality strength 1, the local init), random-resized crop (bicubic) + flip + RandAugment
(9, 0.5), mixup 0.8, cutmix 1.0, random erasing 0.25, label smoothing 0.1; eval: resize 256 (bicubic),
centre crop 224; DeiT's repeated augmentation (3 views of each image).

Arguments: variant=convit_tiny | convit_small | convit_base; data_dir=PATH (TFDS dir with imagenet2012);
runlocal: a 4-block ConViT (2 GPSA) of width 64 on the bundled 8x8 digits in 2x2 patches, 10 steps on a CPU.
"""
from vitjax import config_utils

EXPECTED_TOP1 = {"convit_tiny": 73.1, "convit_small": 81.3, "convit_base": 82.4}


def get_config(arg=None):
    """Returns the ConViT ImageNet-1k config; see the module docstring for the arguments."""
    arg = config_utils.parse_arg(arg, variant="convit_tiny", runlocal=False, data_dir="",
                                 choices=dict(variant=tuple(EXPECTED_TOP1)))
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = arg.variant
    config.model = dict(num_classes=1000, img_size=224, drop_path_rate=0.1, dtype="bfloat16")
    config.objective = "supervised"

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    # timm's create_transform(is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic")
    # and DeiT's regularisation; eval: resize 256 (bicubic), centre crop 224.
    config.input = config_utils.imagenet_input(
        data_dir, randaug="randaug(2, 9, magnitude_std=0.5, increasing=True)",
        label_smoothing=0.1, mixup=0.8, cutmix=1.0, random_erasing=0.25,
        repeated_augmentation=3)

    config.batch_size = 1024
    config.total_epochs = 300.0
    config.optim.name = "adamw"
    config.optim.blr = 2.5e-4  # lr = 5e-4 x batch / 512
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 5.0
    config.optim.warmup_init_lr = 1e-6
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-5

    config.log_every_steps = 100
    config.eval_every_steps = 12510
    config.checkpoint_every_steps = 12510
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model = dict(num_classes=10, img_size=8, in_chans=1, patch_size=2, embed_dim=64, num_heads=4,
                            depth=4, local_up_to_layer=2, drop_path_rate=0.0)
        # No random shifts: with 2x2 patches a one-pixel shift rewrites every token, and a smoke run of
        # tens of steps then barely moves the loss (it falls 2.30 -> ~1.6 in 80 steps without them).
        config.input = config_utils.digits_input(label_smoothing=0.0)
        config_utils.runlocal_schedule(config, batch_size=32, total_steps=10, warmup_steps=2, log_every_steps=5)
        config.optim.blr = 8e-3  # lr 1e-3 at batch 32
        config.optim.warmup_init_lr = 0.0
        config.optim.min_lr = 0.0
    return config
