r"""RMT on ImageNet-1k from scratch (Fan et al., CVPR 2024, "RMT: Retentive Networks Meet Vision Transformers"), the
official qhfan/RMT `classfication_release` recipe.

    python -m vitjax.main --config=configs/rmt_i1k.py --workdir=/ckpt/rmt_t
    python -m vitjax.main --config=configs/rmt_i1k.py:variant=rmt_s --workdir=/ckpt/rmt_s
    python -m vitjax.main --config=configs/rmt_i1k.py:runlocal --workdir=/tmp/rmt_local

Expected top-1 on ImageNet val (official README, 224 px, without token labelling): RMT-T 82.4%, S 84.1%, B 85.0%,
L 85.5%.

The recipe is the official main.py (DeiT's codebase) with run.sh: AdamW, batch 128 per GPU (1024 on the paper's 8
GPUs), lr 5e-4 * batch / 512 = 1e-3, 5 warmup epochs, cosine to 1e-5, 300 epochs, weight decay 0.05, no gradient
clipping, model EMA 0.99996 per 512 images (0.99992 at batch 1024), RandAugment m9 mstd0.5 inc1, mixup 0.8 / cutmix
1.0, label smoothing 0.1, random erasing 0.25; eval centre crop 224 of 256. Drop path is the official constructors'
(their `--drop-path` argument is not read): 0.1 / 0.15 / 0.4 / 0.5 (T / S / B / L).
`runlocal` trains a width-16 two-stage RMT (decomposed then whole-map attention, 32 px digits) for 100 steps on a CPU.
"""
from vitjax import config_utils

_DROP_PATH = {"rmt_t": 0.1, "rmt_s": 0.15, "rmt_b": 0.4, "rmt_l": 0.5}
VARIANTS = tuple(_DROP_PATH)


def get_config(arg=None):
    """Returns the RMT config; arguments: variant (rmt_t, rmt_s, rmt_b, rmt_l), data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="rmt_t", data_dir="", runlocal=False, choices=dict(variant=VARIANTS))
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = arg.variant
    config.model = dict(num_classes=1000, drop_path_rate=_DROP_PATH[arg.variant], dtype="bfloat16")
    config.objective = "supervised"

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    config.input = config_utils.imagenet_input(
        data_dir, randaug="randaug(2, 9, magnitude_std=0.5, increasing=True)", label_smoothing=0.1, mixup=0.8,
        cutmix=1.0, random_erasing=0.25)

    config.batch_size = 1024
    config.total_epochs = 300.0
    config.optim.name = "adamw"
    config.optim.blr = 5e-4 * 256 / 512  # lr = blr * batch / 256 = 1e-3 at batch 1024 (the official / 512 rule)
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 5.0
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-5
    config.ema_decay = 0.99996 ** (1024 / 512)

    config.log_every_steps = 100
    config.eval_every_steps = 2500
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model_name = "rmt_t"
        config.model = dict(num_classes=10, img_size=32, in_chans=1, embed_dims=(16, 32), depths=(1, 1),
                            num_heads=(2, 2), init_values=(2, 2), heads_ranges=(4, 6), mlp_ratios=(3, 3),
                            decomposed=(True, False), layer_scales=(False, True), projection=64, drop_path_rate=0.1)
        config.input = config_utils.digits_input(32, label_smoothing=0.1)
        config_utils.runlocal_schedule(config)
        config.ema_decay = 0.0
        config.optim.blr = 4e-3  # lr 1e-3 at batch 64
    return config
