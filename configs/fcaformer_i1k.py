r"""FcaFormer on ImageNet-1k from scratch (Zhang et al., ICCV 2023, "FcaFormer: Forward Cross Attention in Hybrid
Vision Transformer"), the official hkzhang-git/FcaFormer image_classification recipe.

    python -m vitjax.main --config=configs/fcaformer_i1k.py --workdir=/ckpt/fcaformer_l2
    python -m vitjax.main --config=configs/fcaformer_i1k.py:variant=fcaformer_l1 --workdir=/ckpt/fcaformer_l1
    python -m vitjax.main --config=configs/fcaformer_i1k.py:runlocal --workdir=/tmp/fcaformer_local

Expected top-1 on ImageNet val (the official fcaformer.py's comments; L1 and L2 also in its README, 224 px):
FcaFormer-L1 80.3%, L2 83.1%, L3 84.2%, L4 84.9%.

The recipe is the official main.py's defaults (ConvNeXt's codebase) with scripts/fca_l{1,2,3,4}.sh: AdamW, batch 128
per GPU on 8 GPUs (1024), lr 2e-3 (the scripts' value, not scaled by batch), 20 warmup epochs, cosine to 1e-6, 300
epochs, weight decay 0.05, no gradient clipping, layer scale 1e-6, model EMA 0.9999 (evaluated), RandAugment m9
mstd0.5 inc1, mixup 0.8 / cutmix 1.0, label smoothing 0.1, random erasing 0.25; eval resize 256, centre crop 224.
Drop path per script: 0.0 / 0.1 / 0.2 / 0.4 (L1 / L2 / L3 / L4).
`runlocal` trains a width-8/16 FcaFormer (one ConvNeXt block per conv stage, two Fca blocks per Fca stage, 32 px
digits) for 100 steps on a CPU.
"""
from vitjax import config_utils

_DROP_PATH = {"fcaformer_l1": 0.0, "fcaformer_l2": 0.1, "fcaformer_l3": 0.2, "fcaformer_l4": 0.4}
VARIANTS = tuple(_DROP_PATH)


def get_config(arg=None):
    """Returns the FcaFormer config; arguments: variant (fcaformer_l1 .. l4), data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="fcaformer_l2", data_dir="", runlocal=False,
                                 choices=dict(variant=VARIANTS))
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
    config.optim.blr = 2e-3 * 256 / 1024  # lr = blr * batch / 256 = 2e-3 at batch 1024
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 20.0
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-6
    config.ema_decay = 0.9999

    config.log_every_steps = 100
    config.eval_every_steps = 2500
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model_name = "fcaformer_l1"
        config.model = dict(num_classes=10, img_size=32, in_chans=1, embed_dims=(8, 16, 16, 16), depths=(1, 1, 2, 2),
                            num_heads=(0, 0, 2, 2), drop_path_rate=0.1)
        config.input = config_utils.digits_input(32, label_smoothing=0.1)
        config_utils.runlocal_schedule(config)
        config.ema_decay = 0.0
        config.optim.blr = 8e-3  # lr 2e-3 at batch 64
    return config
