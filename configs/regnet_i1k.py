r"""RegNetY trained from scratch on ImageNet-1k: pycls's `dds_baselines` recipe (Radosavovic et al. 2020).

    python -m vitjax.main --config=configs/regnet_i1k.py --workdir=/ckpt/regnety_160
    python -m vitjax.main --config=configs/regnet_i1k.py:variant=regnety_032 --workdir=/ckpt/regnety_032
    python -m vitjax.main --config=configs/regnet_i1k.py:runlocal --workdir=/tmp/regnet_local   # digits, CPU

Expected top-1 on ImageNet val (224 px, resize 256 + centre crop): RegNetY-16GF (`regnety_160`, DeiT's
teacher) 82.9% (the teacher row of Touvron et al. 2021, Table 2); not re-measured in vitjax. The released
weights convert with `vitjax.convert.from_timm` (timm's `regnety_160.deit_in1k`).

The recipe (pycls configs/dds_baselines/regnet/RegNetY-16GF_dds_1gpu.yaml): SGD with Nesterov momentum 0.9
(coupled weight decay 5e-5), lr 0.1 at batch 128 (blr 0.2 per 256, linear scaling), 5 warmup epochs from
a tenth of the peak, half-cosine to 0 over 100 epochs; random-resized crop + flip; eval resize 256, centre
crop 224. pycls also adds PCA lighting noise, which vitjax does not have. pycls decays every parameter;
vitjax never decays 1-D parameters (BN scales) and biases.

`runlocal` trains a four-stage RegNetY (widths 8 / 16 / 32 / 64, six blocks) on the bundled digits resized
to 32x32, in seconds on a CPU.
"""
from vitjax import config_utils

VARIANTS = ("regnety_002", "regnety_004", "regnety_006", "regnety_008", "regnety_016", "regnety_032",
            "regnety_040", "regnety_064", "regnety_080", "regnety_120", "regnety_160", "regnety_320")


def get_config(arg=None):
    """Returns the RegNetY ImageNet-1k config; arguments: variant (a registered regnety name), data_dir,
    runlocal."""
    arg = config_utils.parse_arg(arg, variant="regnety_160", runlocal=False, data_dir="",
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
    config.optim.blr = 0.2     # lr 0.1 per 128 images
    config.optim.momentum = 0.9
    config.optim.nesterov = True
    config.optim.weight_decay = 5e-5
    config.optim.warmup_epochs = 5.0
    config.optim.warmup_init_lr = 0.1 * 0.2 * config.batch_size / 256  # pycls's WARMUP_FACTOR 0.1
    config.optim.schedule = "cosine"
    config.optim.min_lr = 0.0

    config.log_every_steps = 100
    config.eval_every_steps = 2500
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model = dict(num_classes=10, img_size=32, in_chans=1, w0=8, wa=8.0, wm=2.0, depth=6, group_size=8)
        config.input = config_utils.digits_input(32, padding=4)
        config_utils.runlocal_schedule(config)
        config.optim.blr = 0.4  # lr 0.1 at batch 64
        config.optim.warmup_init_lr = 0.0
    return config
