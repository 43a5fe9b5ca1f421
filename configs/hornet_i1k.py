r"""HorNet on ImageNet-1k from scratch (Rao et al. 2022, "HorNet: Efficient High-Order Spatial Interactions with
Recursive Gated Convolutions"), the official raoyongming/HorNet TRAINING.md recipe.

    python -m vitjax.main --config=configs/hornet_i1k.py --workdir=/ckpt/hornet_tiny_7x7
    python -m vitjax.main --config=configs/hornet_i1k.py:variant=hornet_small_gf --workdir=/ckpt/hornet_small_gf
    python -m vitjax.main --config=configs/hornet_i1k.py:runlocal --workdir=/tmp/hornet_local

Expected top-1 on ImageNet val (official README, 224 px, EMA weights as the recipe evaluates them):
HorNet-T 7x7 82.8%, T GF 83.0%, S 7x7 83.8%, S GF 84.0%, B 7x7 84.2%, B GF 84.3%.

The recipe is the official main.py's (ConvNeXt's codebase) with TRAINING.md's per-model arguments: AdamW, total
batch 4096, lr 4e-3, 20 warmup epochs, cosine to 1e-6, 300 epochs, weight decay 0.05, layer scale 1e-6, model EMA
(decay 0.9999, ConvNeXt's default), RandAugment m9 mstd0.5 (S GF: m12), mixup 0.8 / cutmix 1.0, label smoothing
0.1, random erasing 0.25; eval resize 256, centre crop 224. Per model: drop path 0.2 / 0.4 / 0.5 (T / S / B) and
gradient clipping at 100 (T 7x7), 5 (S and B 7x7) or 1 (every GF model).
`runlocal` trains a width-8 HorNet 7x7 (one block per stage, 32 px digits) for 100 steps on a CPU (a GF
model's gradients are checked in tests/test_registry.py; its FFTs add a third to the CPU compile).
"""
from vitjax import config_utils

VARIANTS = ("hornet_tiny_7x7", "hornet_tiny_gf", "hornet_small_7x7", "hornet_small_gf", "hornet_base_7x7",
            "hornet_base_gf")
# (drop path, gradient clipping) of each model's TRAINING.md command.
_PER_MODEL = {"hornet_tiny_7x7": (0.2, 100.0), "hornet_tiny_gf": (0.2, 1.0), "hornet_small_7x7": (0.4, 5.0),
              "hornet_small_gf": (0.4, 1.0), "hornet_base_7x7": (0.5, 5.0), "hornet_base_gf": (0.5, 1.0)}


def get_config(arg=None):
    """Returns the HorNet config; arguments: variant (an official ImageNet-1k model name), data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="hornet_tiny_7x7", data_dir="", runlocal=False,
                                 choices=dict(variant=VARIANTS))
    config = config_utils.default_config()
    config.seed = 0
    drop_path, clip = _PER_MODEL[arg.variant]

    config.model_name = arg.variant
    config.model = dict(num_classes=1000, drop_path_rate=drop_path, dtype="bfloat16")
    config.objective = "supervised"

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    magnitude = 12 if arg.variant == "hornet_small_gf" else 9
    config.input = config_utils.imagenet_input(
        data_dir, randaug=f"randaug(2, {magnitude}, magnitude_std=0.5, increasing=True)",
        label_smoothing=0.1, mixup=0.8, cutmix=1.0, random_erasing=0.25)

    config.batch_size = 4096
    config.total_epochs = 300.0
    config.optim.name = "adamw"
    config.optim.blr = 4e-3 * 256 / 4096  # lr = blr * batch / 256 = 4e-3 at batch 4096
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 20.0
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-6
    config.optim.clip_grad_norm = clip
    config.ema_decay = 0.9999

    config.log_every_steps = 100
    config.eval_every_steps = 2500
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model_name = "hornet_tiny_7x7"
        config.model = dict(num_classes=10, img_size=32, in_chans=1, base_dim=8, depths=(1, 1, 1, 1),
                            drop_path_rate=0.1)
        config.input = config_utils.digits_input(32, label_smoothing=0.1)
        config_utils.runlocal_schedule(config)
        config.ema_decay = 0.0
        config.optim.blr = 8e-3  # lr 2e-3 at batch 64
    return config
