r"""ResNet trained from scratch on ImageNet-1k: pycls's `dds_baselines` recipe (Radosavovic et al. 2020).

    python -m vitjax.main --config=configs/resnet_i1k.py --workdir=/ckpt/resnet50
    python -m vitjax.main --config=configs/resnet_i1k.py:variant=resnet50d --workdir=/ckpt/resnet50d
    python -m vitjax.main --config=configs/resnet_i1k.py:runlocal --workdir=/tmp/resnet_local   # digits, CPU

Expected top-1 on ImageNet val (224 px, resize 256 + centre crop): about 77% for ResNet-50 (pycls's model
zoo lists R-50-1x64d at 23.2% top-1 error with this recipe); not re-measured in vitjax. The main use here
is a teacher for distillation (configs/vit_i1k.py:distilled, experiments/distill_digits.py).

The recipe (pycls configs/dds_baselines/resnet/R-50-1x64d_dds_8gpu.yaml): SGD momentum 0.9 (coupled
weight decay 5e-5, torch's), lr 0.2 at batch 256 (linear scaling), half-cosine to 0 over 100 epochs, no
warmup; random-resized crop + flip; eval resize 256, centre crop 224. pycls also adds PCA lighting noise,
which vitjax does not have. pycls decays every parameter; vitjax never decays
1-D parameters (BN scales) and biases.

`runlocal` trains a ResNet-18-shaped network with widths 8 / 16 / 24 / 32 on the bundled digits resized to
32x32, in seconds on a CPU.
"""
from vitjax import config_utils

VARIANTS = tuple(f"resnet{depth}{suffix}" for depth in (18, 26, 34, 50, 101, 152) for suffix in ("", "d"))


def get_config(arg=None):
    """Returns the ResNet ImageNet-1k config; arguments: variant (a registered resnet name), data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="resnet50", runlocal=False, data_dir="",
                                 choices=dict(variant=VARIANTS))
    config = config_utils.default_config()
    config.seed = 0
    config.model_name = arg.variant
    config.model = dict(num_classes=1000, dtype="bfloat16")
    config.objective = "supervised"

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    config.input = config_utils.imagenet_input(data_dir, crop_pct=224 / 256, interpolation="bilinear")

    config.batch_size = 1024
    config.total_epochs = 100.0
    config.optim.name = "sgd"
    config.optim.blr = 0.2     # lr 0.2 per 256 images
    config.optim.momentum = 0.9
    config.optim.weight_decay = 5e-5
    config.optim.warmup_epochs = 0.0
    config.optim.schedule = "cosine"
    config.optim.min_lr = 0.0

    config.log_every_steps = 100
    config.eval_every_steps = 2500
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model = dict(num_classes=10, img_size=32, in_chans=1, widths=(8, 16, 24, 32), depths=(1, 1, 1, 1))
        config.input = config_utils.digits_input(32, padding=4)
        config_utils.runlocal_schedule(config)
        config.optim.blr = 0.4  # lr 0.1 at batch 64
    return config
