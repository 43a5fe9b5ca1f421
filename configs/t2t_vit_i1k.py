r"""T2T-ViT on ImageNet-1k from scratch (Yuan et al. 2021, "Tokens-to-Token ViT: Training Vision Transformers from
Scratch on ImageNet"), the official yitu-opensource/T2T-ViT recipe.

    python -m vitjax.main --config=configs/t2t_vit_i1k.py --workdir=/ckpt/t2t_vit_14
    python -m vitjax.main --config=configs/t2t_vit_i1k.py:variant=t2t_vit_7 --workdir=/ckpt/t2t_vit_7
    python -m vitjax.main --config=configs/t2t_vit_i1k.py:runlocal --workdir=/tmp/t2t_vit_local

Expected top-1 on ImageNet val (official README, 224 px, crop 0.9): T2T-ViT-7 71.7%, -10 75.2%, -12 76.5%,
-14 81.5%, -19 81.9%, -24 82.3%; T2T-ViT_t-14 81.7%, _t-19 82.4%, _t-24 82.6%.

The recipe is the official main.py's (timm's training script) with the README's commands: AdamW, batch 512
(8 GPUs x 64), lr 5e-4 (T2T-ViT-7/10/12: lr 1e-3 at batch 512 and weight decay 0.03; -19/-24: 0.065), weight
decay 0.05, cosine to 1e-5 after 10 warmup epochs from 1e-6, 300 epochs (+10 cooldown epochs at the minimum lr,
folded into 310 here), drop path 0.1, RandAugment m9 mstd0.5, mixup 0.8 / cutmix 1.0, label smoothing 0.1,
random erasing 0.25. Not reproduced: the model EMA (decay 0.99996) that main.py keeps by default.
`runlocal` trains a width-32 T2T-ViT (performer, token_dim 16) on 16 px digits for 100 steps on a CPU.
"""
from vitjax import config_utils

VARIANTS = ("t2t_vit_7", "t2t_vit_10", "t2t_vit_12", "t2t_vit_14", "t2t_vit_19", "t2t_vit_24", "t2t_vit_t_14",
            "t2t_vit_t_19", "t2t_vit_t_24", "t2t_vit_14_resnext", "t2t_vit_14_wide")
# (lr at batch 512, weight decay) from the official README's training commands.
_SMALL = ("t2t_vit_7", "t2t_vit_10", "t2t_vit_12")
_LARGE = ("t2t_vit_19", "t2t_vit_24", "t2t_vit_t_19", "t2t_vit_t_24")


def get_config(arg=None):
    """Returns the T2T-ViT config; arguments: variant (an official model name), data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="t2t_vit_14", data_dir="", runlocal=False,
                                 choices=dict(variant=VARIANTS))
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = arg.variant
    config.model = dict(num_classes=1000, drop_path_rate=0.1, dtype="bfloat16")
    config.objective = "supervised"

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    # Eval: resize floor(224 / 0.9) = 248 (bicubic), centre crop 224 (the official default_cfg).
    config.input = config_utils.imagenet_input(
        data_dir, crop_pct=0.9, randaug="randaug(2, 9, magnitude_std=0.5, increasing=True)",
        label_smoothing=0.1, mixup=0.8, cutmix=1.0, random_erasing=0.25)

    config.batch_size = 512
    config.total_epochs = 310.0
    config.optim.name = "adamw"
    lr = 1e-3 if arg.variant in _SMALL else 5e-4
    config.optim.blr = lr * 256 / 512  # lr = blr * batch / 256
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.03 if arg.variant in _SMALL else 0.065 if arg.variant in _LARGE else 0.05
    config.optim.warmup_epochs = 10.0
    config.optim.warmup_init_lr = 1e-6
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-5

    config.log_every_steps = 100
    config.eval_every_steps = 2500
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model_name = "t2t_vit_7"
        config.model = dict(num_classes=10, img_size=16, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                            token_dim=16, drop_path_rate=0.1)
        config.input = config_utils.digits_input(16, label_smoothing=0.1)
        config_utils.runlocal_schedule(config)
        config.optim.blr = 8e-3  # lr 2e-3 at batch 64
    return config
