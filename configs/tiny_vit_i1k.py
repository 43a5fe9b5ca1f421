r"""TinyViT trained from scratch on ImageNet-1k (Wu et al. 2022, Sec. 5 "IN-1k" rows; the official
TinyViT/configs/1k recipe, which inherits Swin's training code).

    python -m vitjax.main --config=configs/tiny_vit_i1k.py --workdir=/ckpt/tiny_vit_5m
    python -m vitjax.main --config=configs/tiny_vit_i1k.py:variant=21m --workdir=/ckpt/tiny_vit_21m
    python -m vitjax.main --config=configs/tiny_vit_i1k.py:runlocal --workdir=/tmp/tiny_vit_local

Expected top-1 on ImageNet val at 224, trained on IN-1k only (official model zoo): TinyViT-5M 79.1%,
TinyViT-11M 81.5%, TinyViT-21M 83.1%. (The paper's headline 80.7 / 83.2 / 84.8% need IN-22k pretraining
with distillation from CLIP-ViT-L/14, which is not this recipe.)

The recipe: AdamW (0.9, 0.999), 300 epochs, batch 1024, lr 1e-3 (blr 2.5e-4; the official code scales
5e-4 per 512 images), 20 linear warmup epochs from 1e-6, cosine to 1e-5, weight decay 0.05 (not on norms,
biases and attention biases), gradient-norm clip 5.0, stochastic depth 0.0 / 0.1 / 0.2 for 5M / 11M / 21M.
Augmentation: random-resized crop (bicubic) + flip + RandAugment (m9, mstd 0.5), mixup 0.8 / cutmix 1.0,
label smoothing 0.1, random erasing 0.25. Eval: resize 256 (bicubic), centre crop 224 (timm's weights
use crop 0.95; the official evaluation crops 0.875).

`runlocal` trains a shrunk TinyViT-5M (widths 16 / 32 / 48, one block per stage) on the bundled digits
resized to 32x32, in seconds on a CPU.
"""
from vitjax import config_utils

PAPER = {
    "5m": dict(model_name="tiny_vit_5m_224", drop_path_rate=0.0),
    "11m": dict(model_name="tiny_vit_11m_224", drop_path_rate=0.1),
    "21m": dict(model_name="tiny_vit_21m_224", drop_path_rate=0.2),
}


def get_config(arg=None):
    """Returns the TinyViT ImageNet-1k config; arguments: variant (5m|11m|21m), data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="5m", runlocal=False, data_dir="", choices=dict(variant=tuple(PAPER)))
    recipe = PAPER[arg.variant]
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = recipe["model_name"]
    config.model = dict(num_classes=1000, drop_path_rate=recipe["drop_path_rate"], dtype="bfloat16")
    config.objective = "supervised"

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    # timm's create_transform(is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic")
    # and DeiT's regularisation; eval: resize 256 (bicubic), centre crop 224.
    config.input = config_utils.imagenet_input(
        data_dir, randaug="randaug(2, 9, magnitude_std=0.5, increasing=True)",
        label_smoothing=0.1, mixup=0.8, cutmix=1.0, random_erasing=0.25)

    config.batch_size = 1024
    config.total_epochs = 300.0
    config.optim.name = "adamw"
    config.optim.blr = 2.5e-4  # lr = 1e-3 at batch 1024
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 20.0
    config.optim.warmup_init_lr = 1e-6
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-5
    config.optim.clip_grad_norm = 5.0

    config.log_every_steps = 100
    config.eval_every_steps = 2500
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        # 32x32 in: the stem's stride 4 gives 8x8, then 4x4 and 2x2 maps, each one window.
        config.model = dict(num_classes=10, img_size=32, in_chans=1, embed_dims=(16, 32, 48), depths=(1, 1, 1),
                            num_heads=(1, 2, 3), window_sizes=(7, 4, 2))
        config.input = config_utils.digits_input(32, padding=4, label_smoothing=0.1)
        config_utils.runlocal_schedule(config)
        config.optim.blr = 5e-3  # lr 1.25e-3 at batch 64
        config.optim.warmup_init_lr = 0.0
        config.optim.min_lr = 0.0
    return config
