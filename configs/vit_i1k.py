r"""ViT-S/16 and ViT-B/16 trained from scratch on ImageNet-1k: the DeiT recipe, or big_vision's plain one.

    python -m vitjax.main --config=configs/vit_i1k.py --workdir=/ckpt/deit_s16
    python -m vitjax.main --config=configs/vit_i1k.py:variant=B/16 --workdir=/ckpt/deit_b16
    python -m vitjax.main --config=configs/vit_i1k.py:recipe=plain,epochs=90 --workdir=/ckpt/vit_s16_plain
    python -m vitjax.main --config=configs/vit_i1k.py:runlocal --workdir=/tmp/vit_i1k_local
    python -m vitjax.main --config=configs/vit_i1k.py:variant=B/16,distilled,teacher_init=/ckpt/regnety_160.pth \
        --workdir=/ckpt/deit_b16_distilled

Expected top-1 on ImageNet val (224 px, resize 256 + centre crop):
  recipe=deit  (Touvron et al. 2021, "Training data-efficient image transformers", Table 7):
               DeiT-S (S/16) 79.8%, DeiT-B (B/16) 81.8% at 300 epochs, with DeiT's repeated
               augmentation (3 views of each image, `input.repeated_augmentation=3`).
  recipe=plain (Beyer, Zhai, Kolesnikov 2022, "Better plain ViT baselines for ImageNet-1k", big_vision's
               configs/vit_s16_i1k.py): S/16 76.5% at 90 epochs, 78.5% at 150, 80.0% at 300.
  distilled    (DeiT with its distillation token, Touvron et al. 2021, Table 5): DeiT-S 81.2%, DeiT-B 83.4%
               at 300 epochs, hard distillation from RegNetY-16GF (82.9% top-1).

DeiT recipe: AdamW (0.9, 0.999), batch 1024, lr 5e-4 per 512 images (blr 2.5e-4 per 256), 5 warmup
epochs from 1e-6, cosine to 1e-5, weight decay 0.05 (not on norms, biases, tokens, position
embeddings), drop-path 0.1, no gradient clipping, 300 epochs. Augmentation: random-resized crop
(bicubic) + flip + RandAugment (m9, mstd 0.5), mixup 0.8 / cutmix 1.0, label smoothing 0.1, random
erasing 0.25, repeated augmentation x3; ImageNet mean/std normalization; class token. No EMA, no
distillation, unless `distilled`: DeiT's distillation token and second head, trained with the `distill`
objective's hard distillation (alpha 0.5: the class head learns the labels, the distillation head the
teacher's argmax) from the paper's teacher `regnety_160` (RegNetY-16GF, 224 px, loaded from
`teacher_init=PATH`: timm's `regnety_160.deit_in1k` file or a vitjax workdir; `teacher=NAME` picks
another registered model). The teacher sees the student's augmented (mixed) images, as in DeiT.

Plain recipe: global average pooling (no class token), 2-D sin-cos position embeddings, a tanh
pre-logits layer, zero-initialised head; Adam (0.9, 0.999) lr 1e-3, 10k warmup steps, cosine to 0,
decoupled weight decay 1e-4 per unit of schedule (0.1 here, where decay is scaled by the lr), gradient
clipping at 1.0, batch 1024, RandAugment(2, 10), mixup 0.2, no dropout or drop-path, inputs in [-1, 1].

Both compute in bf16 with fp32 master weights. `runlocal` keeps the recipe but trains a ViT of width
32 on the bundled digits (16x16, 4x4 patches) for 100 steps of 64, in seconds on a CPU. `data_dir=PATH`
points at the TFDS data dir holding imagenet2012 (default $TFDS_DATA_DIR or ~/tensorflow_datasets).
"""
from vitjax import config_utils

VARIANTS = ("S/16", "B/16")
RECIPES = ("deit", "plain")


def _deit(config, variant: str, data_dir: str) -> None:
    """Sets the DeiT recipe (Touvron et al. 2021, Sec. 6 and Table 9)."""
    config.model = dict(variant=variant, num_classes=1000, img_size=224, drop_path_rate=0.1, dtype="bfloat16")
    # timm's create_transform(is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic");
    # eval: resize 256 (bicubic), centre crop 224.
    config.input = config_utils.imagenet_input(
        data_dir, randaug="randaug(2, 9, magnitude_std=0.5, increasing=True)",
        label_smoothing=0.1, mixup=0.8, cutmix=1.0, random_erasing=0.25,
        repeated_augmentation=3)
    config.total_epochs = 300.0
    config.optim.name = "adamw"
    config.optim.blr = 2.5e-4  # DeiT: 5e-4 * batch / 512
    config.optim.b1, config.optim.b2, config.optim.eps = 0.9, 0.999, 1e-8
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 5.0
    config.optim.warmup_init_lr = 1e-6
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-5


def _plain(config, variant: str, epochs: int, data_dir: str) -> None:
    """Sets big_vision's plain ViT baseline (Beyer et al. 2022)."""
    width = {"S/16": 384, "B/16": 768}[variant]
    config.model = dict(variant=variant, num_classes=1000, img_size=224, class_token=False, global_pool="avg",
                        fc_norm=False, pos_embed="sincos2d", representation_size=width, head_zero_init=True,
                        dtype="bfloat16")
    # big_vision's inception crop + flip + RandAugment(2, 10), resize 256 + centre crop 224 (bilinear), in [-1, 1].
    config.input = config_utils.imagenet_input(
        data_dir, interpolation=None, randaug="randaug(2, 10)", normalize="value_range(-1, 1)", mixup=0.2)
    config.total_epochs = float(epochs)
    config.optim.name = "adamw"
    config.optim.lr = 1e-3
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.1  # big_vision's wd 1e-4 is not multiplied by the base lr 1e-3
    config.optim.warmup_steps = 10_000
    config.optim.schedule = "cosine"
    config.optim.min_lr = 0.0
    config.optim.clip_grad_norm = 1.0


def get_config(arg=None):
    """Returns the ImageNet-1k ViT config; arguments: variant, recipe, epochs (plain), data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="S/16", recipe="deit", epochs=90, runlocal=False, data_dir="",
                                 distilled=False, teacher="regnety_160", teacher_init="",
                                 choices=dict(variant=VARIANTS, recipe=RECIPES, epochs=(90, 150, 300)))
    if arg.distilled and (arg.recipe != "deit" or not arg.teacher_init):
        raise ValueError("distilled is DeiT's recipe with a trained teacher: give recipe=deit and "
                         f"teacher_init=PATH (a timm {arg.teacher} file or a vitjax workdir)")
    config = config_utils.default_config()
    config.seed = 0
    config.model_name = "vit"
    config.objective = "supervised"

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    config.batch_size = 1024
    config.eval_batch_size = 1000  # 50 batches cover the 50,000 validation images
    if arg.recipe == "deit":
        _deit(config, arg.variant, data_dir)
    else:
        _plain(config, arg.variant, arg.epochs, data_dir)

    if arg.distilled:
        _distill(config, arg.teacher, arg.teacher_init)

    config.log_every_steps = 100
    config.eval_every_steps = 5000
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        # The same recipe on the bundled digits: ViT width 32 on 16x16 gray images in 4x4 patches.
        model = dict(config.model)
        model.update(variant="mu/4", num_classes=10, img_size=16, in_chans=1, embed_dim=32, depth=2,
                     num_heads=2, mlp_dim=64, dtype="float32")
        if "representation_size" in model:
            model["representation_size"] = 32
        config.model = model
        # The digits replace ImageNet; the recipe's label smoothing, mixup and random erasing stay.
        # Repeated augmentation does not: 3 copies in a batch of 64 leave too few distinct digits.
        config.input.update(config_utils.digits_input(16, padding=1), data_dir=None)
        if "repeated_augmentation" in config.input:
            del config.input["repeated_augmentation"]
        config_utils.runlocal_schedule(config, warmup_steps=2)
        if arg.recipe == "deit":
            config.optim.blr = 5e-3  # lr 1.25e-3 at batch 64: a width-32 ViT wants more than a ViT-S
        if arg.distilled:
            model.update(distilled=True)
            # A digits teacher of the same family, at the student's 16x16 gray input (a RegNetY:
            # regnet_i1k.py:runlocal's network).
            teacher = dict(num_classes=10, img_size=16, in_chans=1)
            if arg.teacher.startswith("regnety"):
                teacher.update(w0=8, wa=8.0, wm=2.0, depth=6, group_size=8)
            config.objective_kwargs.teacher_model = teacher
    return config


def _distill(config, teacher: str, teacher_init: str) -> None:
    """Sets DeiT's distillation (Touvron et al. 2021, Sec. 5): distillation token, hard labels from `teacher`."""
    config.model = dict(config.model, distilled=True)
    config.objective = "distill"
    config.objective_kwargs = dict(teacher=teacher, teacher_init=teacher_init, teacher_model=dict(num_classes=1000),
                                   distillation_type="hard", alpha=0.5)
