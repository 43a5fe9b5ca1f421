r"""SG-Former on ImageNet-1k from scratch (Ren et al., ICCV 2023, "SG-Former: Self-guided Transformer with Evolving
Token Reallocation"), the official OliverRensu/SG-Former recipe (README commands, main.py defaults).

    python -m vitjax.main --config=configs/sgformer_i1k.py --workdir=/ckpt/sgformer_s
    python -m vitjax.main --config=configs/sgformer_i1k.py:variant=sgformer_b --workdir=/ckpt/sgformer_b
    python -m vitjax.main --config=configs/sgformer_i1k.py:runlocal --workdir=/tmp/sgformer_local

Expected top-1 on ImageNet val (224 px, the paper's ImageNet-1k table): SG-Former-S 83.2%, M 84.1%, B 84.7%.

The recipe is the official main.py (timm's train script) with the README's commands: AdamW, batch 128 per GPU on 8
GPUs (1024), lr 1e-3 (not scaled by batch), 20 warmup epochs, cosine to 1e-5 over 300 epochs (timm then adds 10
cool-down epochs at the minimum, left out here), weight decay 0.05, no gradient clipping, model EMA 0.99992,
RandAugment m9 mstd0.5 inc1, mixup 0.8 / cutmix 1.0, label smoothing 0.1, random erasing 0.25, the 224 px size the
official merge layers are built for; eval centre crop 0.875 (timm's default). Drop path per README command: 0.1 /
0.2 / 0.4 (S / M / B).
`runlocal` trains a two-stage width-8/16 SG-Former (one hybrid-scale and one self-guided block at sr 4 on a 14x14
map, then full attention on 7x7; 56 px digits) for 100 steps on a CPU.
"""
from vitjax import config_utils

_DROP_PATH = {"sgformer_s": 0.1, "sgformer_m": 0.2, "sgformer_b": 0.4}
VARIANTS = tuple(_DROP_PATH)


def get_config(arg=None):
    """Returns the SG-Former config; arguments: variant (sgformer_s, sgformer_m, sgformer_b), data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="sgformer_s", data_dir="", runlocal=False,
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
    config.optim.blr = 1e-3 * 256 / 1024  # lr = blr * batch / 256 = 1e-3 at batch 1024
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 20.0
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-5
    config.ema_decay = 0.99992

    config.log_every_steps = 100
    config.eval_every_steps = 2500
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model_name = "sgformer_s"
        config.model = dict(num_classes=10, img_size=56, in_chans=1, embed_dims=(8, 16), depths=(2, 1),
                            num_heads=(2, 2), mlp_ratios=(4, 4), sr_ratios=(4, 1), drop_path_rate=0.1)
        config.input = config_utils.digits_input(56, label_smoothing=0.1)
        config_utils.runlocal_schedule(config)
        config.ema_decay = 0.0
        config.optim.blr = 4e-3  # lr 1e-3 at batch 64
    return config
