r"""SpectFormer on ImageNet-1k from scratch (Patro et al., 2023, "SpectFormer: Frequency and Attention is what you
need in a Vision Transformer"), the official badripatro/SpectFormers recipes.

    python -m vitjax.main --config=configs/spectformer_i1k.py --workdir=/ckpt/spectformer_xs
    python -m vitjax.main --config=configs/spectformer_i1k.py:variant=spectformer_s --workdir=/ckpt/spectformer_h_s
    python -m vitjax.main --config=configs/spectformer_i1k.py:runlocal --workdir=/tmp/spectformer_local

Expected top-1 on ImageNet val (224 px): the official training logs' best epochs give spectformer-xs 80.2%,
-ti 76.9%, -s 81.7%, -b 82.1% (vanilla_architecture/logs); the official README gives the hierarchical
SpectFormer-H-S (spectformer_s) 84.25% and -L (spectformer_l) 85.7%, trained with token labelling, which vitjax does
not implement (these runs train on the class labels alone and may land lower).

Vanilla (`vanilla_architecture/main.sh` + `main_spectformer.py` defaults): AdamW, batch 128 per GPU on 8 GPUs (1024),
lr 5e-4 * batch / 512 = 1e-3, 5 warmup epochs, cosine to 1e-5, 320 epochs, weight decay 0.05, gradient clipping 1.0,
RandAugment m9 mstd0.5 inc1, mixup 0.8 / cutmix 1.0, label smoothing 0.1, no random erasing, no EMA. Drop path is the
constructors' (their --drop-path argument is not read): 0 (xs, ti), 0.15 (s), 0.25 (b).
Hierarchical (`hierarchical_architecture/main.sh`, `configs/spectformer/*.py`): the same optimizer and schedule for
310 epochs, no clipping (1.0 for _l), random erasing 0.25, repeated augmentation x3, drop path 0.1 / 0.1 / 0.3.
`runlocal` trains a width-16 vanilla SpectFormer (a spectral block, then an attention block, 32 px digits as an 8x8
token map) on a CPU.
"""
from vitjax import config_utils

_DROP_PATH = {"spectformer-xs": 0.0, "spectformer-ti": 0.0, "spectformer-s": 0.15, "spectformer-b": 0.25,
              "spectformer_s": 0.1, "spectformer_b": 0.1, "spectformer_l": 0.3}
VARIANTS = tuple(_DROP_PATH)


def get_config(arg=None):
    """Returns the SpectFormer config; arguments: variant (an official model name), data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="spectformer-xs", data_dir="", runlocal=False,
                                 choices=dict(variant=VARIANTS))
    hierarchical = "_" in arg.variant
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = arg.variant
    config.model = dict(num_classes=1000, drop_path_rate=_DROP_PATH[arg.variant], dtype="bfloat16")
    config.objective = "supervised"

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    config.input = config_utils.imagenet_input(
        data_dir, randaug="randaug(2, 9, magnitude_std=0.5, increasing=True)", label_smoothing=0.1, mixup=0.8,
        cutmix=1.0, random_erasing=0.25 if hierarchical else None, repeated_augmentation=3 if hierarchical else 1)

    config.batch_size = 1024
    config.total_epochs = 310.0 if hierarchical else 320.0
    config.optim.name = "adamw"
    config.optim.blr = 5e-4 * 256 / 512  # lr = blr * batch / 256 = 1e-3 at batch 1024 (the official / 512 rule)
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 5.0
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-5
    if not hierarchical or arg.variant == "spectformer_l":
        config.optim.clip_grad_norm = 1.0

    config.log_every_steps = 100
    config.eval_every_steps = 2500
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model_name = "spectformer-xs"
        config.model = dict(num_classes=10, img_size=32, patch_size=4, in_chans=1, embed_dim=16, depth=2,
                            spectral_depth=1, num_heads=2, mlp_ratio=2, drop_path_rate=0.1)
        config.input = config_utils.digits_input(32, label_smoothing=0.1)
        config_utils.runlocal_schedule(config)
        config.optim.blr = 8e-3  # lr 2e-3 at batch 64
    return config
