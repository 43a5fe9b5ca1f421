r"""LeViT trained on ImageNet-1k (Graham et al. 2021, Sec. 5.1; the official repository's main.py defaults).

    python -m vitjax.main --config=configs/levit_i1k.py --workdir=/ckpt/levit_128s
    python -m vitjax.main --config=configs/levit_i1k.py:variant=256 --workdir=/ckpt/levit_256
    python -m vitjax.main --config=configs/levit_i1k.py:runlocal --workdir=/tmp/levit_local

Expected top-1 on ImageNet val at 224 with the paper's hard distillation from a RegNetY-16GF teacher
(paper Table 3): LeViT-128S 76.6%, LeViT-128 78.6%, LeViT-192 80.0%, LeViT-256 81.6%, LeViT-384 82.6%.

The recipe: 1000 epochs, AdamW (0.9, 0.999), lr 5e-4 per 512 images (blr 2.5e-4), batch 2048 (the
official 8-GPU command: 256 per GPU), 5 linear warmup epochs from 1e-6, cosine to 1e-5, weight decay 0.025
(not on norms, biases and attention biases), no stochastic depth. Augmentation as DeiT: random-resized crop
(bicubic) + flip + RandAugment (m9, mstd 0.5), mixup 0.8 / cutmix 1.0, label smoothing 0.1, random erasing
0.25. Eval: resize 256 (bicubic), centre crop 224.
Distillation: the paper's second head learns the hard labels of a RegNetY-16GF teacher. With
`teacher=NAME,teacher_init=PATH` the run uses vitjax's `distill` objective (DeiT hard distillation,
alpha 0.5) from any registered model, e.g. `teacher=convnext_base,teacher_init=/ckpt/convnext_b.pth`
(a timm file or a vitjax workdir). RegNetY is not registered in vitjax, so the paper's exact teacher
is not available. Without a teacher both heads learn the labels (`distilled_training`: DeiT's
no-teacher baseline), which lowers the expected accuracy. The reference also clips gradients
adaptively (AGC 0.01), which vitjax does not have. As in the reference: repeated augmentation (3 views) and a model EMA (0.99996, reported
as eval_ema/*).

`runlocal` trains a shrunk LeViT-128S (widths 32 / 48, one block per stage) on the bundled digits resized
to 64x64 (4x4 tokens after the stride-16 stem), in seconds on a CPU.
"""
from vitjax import config_utils

VARIANTS = ("128s", "128", "192", "256", "384")


def get_config(arg=None):
    """Returns the LeViT ImageNet-1k config; arguments: variant (128s|128|192|256|384), teacher, teacher_init,
    data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="128s", runlocal=False, data_dir="", teacher="", teacher_init="",
                                 choices=dict(variant=VARIANTS))
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = f"levit_{arg.variant}"
    config.model = dict(num_classes=1000, distilled_training=True, dtype="bfloat16")
    config.objective = "supervised"
    if arg.teacher:
        config.objective = "distill"
        config.objective_kwargs = dict(teacher=arg.teacher, teacher_init=arg.teacher_init or None,
                                       distillation_type="hard", alpha=0.5)

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    # timm's create_transform(is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic")
    # and DeiT's regularisation; eval: resize 256 (bicubic), centre crop 224.
    config.input = config_utils.imagenet_input(
        data_dir, randaug="randaug(2, 9, magnitude_std=0.5, increasing=True)",
        label_smoothing=0.1, mixup=0.8, cutmix=1.0, random_erasing=0.25,
        repeated_augmentation=3)

    config.batch_size = 2048
    config.total_epochs = 1000.0
    config.optim.name = "adamw"
    config.optim.blr = 2.5e-4  # lr = 2e-3 at batch 2048
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.025
    config.optim.warmup_epochs = 5.0
    config.optim.warmup_init_lr = 1e-6
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-5

    config.ema_decay = 0.99996
    config.log_every_steps = 100
    config.eval_every_steps = 2500
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model = dict(num_classes=10, img_size=64, in_chans=1, embed_dim=(32, 48), key_dim=16, depth=(1, 1),
                            num_heads=(2, 3), distilled_training=True)
        config.input = config_utils.digits_input(64, padding=8, label_smoothing=0.1)
        config_utils.runlocal_schedule(config)
        config.optim.blr = 5e-3  # lr 1.25e-3 at batch 64
        config.optim.warmup_init_lr = 0.0
        config.optim.min_lr = 0.0
    return config
