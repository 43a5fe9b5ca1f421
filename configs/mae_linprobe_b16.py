r"""Linear probing of a frozen MAE encoder on ImageNet-1k (He et al. 2021, Appendix A.2, Table 10).

    python -m vitjax.main --config=configs/mae_linprobe_b16.py:init_from=/ckpt/mae_b16 --workdir=/ckpt/lin_b16
    python -m vitjax.main --config=configs/mae_linprobe_b16.py:runlocal,init_from=/tmp/mae_local --workdir=/tmp/lin

Expected top-1 on ImageNet val (the official repo's linear-probing results of the released encoders):
ViT-B/16 about 68%, ViT-L/16 about 76%, ViT-H/14 about 77%.

The recipe: the cls token of the frozen encoder (after its final norm) -> BatchNorm without affine
(eps 1e-6) -> linear head (trunc_normal 0.01); only the head trains. LARS (momentum 0.9, trust
coefficient 0.001), weight decay 0, lr = 0.1 x batch / 256, batch 16384, 90 epochs with 10 warmup,
cosine; random-resized crop (bicubic) + flip, no other augmentation. Same recipe for every variant.
`init_from`: a vitjax workdir of an `mae` run or an official checkpoint; empty probes the random
initialisation (the baseline).
"""
from vitjax import config_utils

VARIANTS = ("B/16", "L/16", "H/14")


def get_config(arg=None):
    """Returns the linear-probing config; arguments: variant, init_from, data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="B/16", init_from="", runlocal=False, data_dir="",
                                 choices=dict(variant=VARIANTS))
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = "vit"
    config.model = dict(variant=arg.variant, img_size=224, num_classes=1000, global_pool="token",
                        dtype="bfloat16")
    config.objective = "mae_linprobe"
    config.objective_kwargs = dict(head_init_std=0.01)
    config.init_from = arg.init_from or None  # also --config.init_from=PATH

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    # Random-resized crop (bicubic) + flip, no other augmentation; eval: resize 256 (bicubic), centre crop 224.
    config.input = config_utils.imagenet_input(data_dir)

    config.batch_size = 16384
    config.total_epochs = 90.0
    config.optim.name = "lars"
    config.optim.blr = 0.1
    config.optim.momentum = 0.9
    config.optim.trust_coefficient = 0.001
    config.optim.weight_decay = 0.0
    config.optim.warmup_epochs = 10.0
    config.optim.schedule = "cosine"
    config.optim.frozen = ("^encoder/",)   # only the head (and its BatchNorm statistics) learn

    config.log_every_steps = 50
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model = dict(config_utils.MAE_RUNLOCAL_ENCODER, num_classes=10, global_pool="token")
        config.input = config_utils.digits_input(padding=1)
        config_utils.runlocal_schedule(config, batch_size=128)
    return config
