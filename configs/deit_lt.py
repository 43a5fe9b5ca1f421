r"""DeiT-LT: a distilled DeiT on a long-tailed split, taught by a CNN trained with SAM (Rangwani et al. 2024,
"DeiT-LT: Distillation Strikes Back for Vision Transformer Training on Long-Tailed Datasets"; the recipe of
the official val-iisc/DeiT-LT sh/train_c10_if100.sh and sh/train_imagenetlt.sh, results in its README table).

    # 1. the teacher: a ResNet trained with SAM on the long-tailed split
    python -m vitjax.main --config=configs/deit_lt.py:stage=teacher --workdir=/ckpt/deit_lt_teacher
    # 2. the DeiT-B student, hard distillation on the teacher's view of its own strongly augmented images
    python -m vitjax.main --config=configs/deit_lt.py:teacher_init=/ckpt/deit_lt_teacher --workdir=/ckpt/deit_lt

    # on a laptop: the same on the long-tailed digits (imbalance 10: 580 of the 1,437 training digits)
    python -m vitjax.main --config=configs/deit_lt.py:stage=teacher,runlocal --workdir=/tmp/deit_lt_teacher
    python -m vitjax.main --config=configs/deit_lt.py:runlocal --workdir=/tmp/deit_lt

Expected (official README table, DeiT-B student): CIFAR-10-LT imbalance 100: 87.5% top-1 overall (head 94.5,
mid 84.1, tail 85.0); imbalance 50: 89.8%; ImageNet-LT: 59.1% (head 66.6, mid 58.3, tail 40.0). Their
teachers are PaCo + SAM ResNets (ResNet-32 on CIFAR, ResNet-50 on ImageNet-LT); PaCo's contrastive teacher
training is not part of vitjax: stage=teacher is plain cross-entropy + SAM, a weaker teacher than the
paper's, so expect less than these figures. `runlocal` (imbalance 10, measured on 2 shared CPU
cores): the teacher (300 steps of 64, 1.5 min) reaches 95.0% top-1 on the digits test split; the student (200
steps of 64, 1.5 min, weights on and mixup off from step 150) 43.3%: a smoke run, mixup and cutmix on 16x16
digits need more steps. The 3-seed comparison with plain CE and DeiT distillation on the long-tailed digits is
`experiments/distill_digits.py --parts=deitlt`.

The student recipe (DeiT's, `arguments.py` defaults, plus the scripts' flags):
- data: `input.long_tail` = CIFAR-LT's exponential split, n_c = int(n_max imbalance^(-c/(C-1))) (imbalance 100
  or 50; CIFAR-10-LT 100 keeps 12,406 of 50,000); the test split stays balanced. DeiT's augmentation at 224:
  RandAugment m9 mstd0.5, random erasing 0.25, mixup 0.8 / cutmix 1.0, label smoothing 0.1, drop-path 0.1.
- loss: hard distillation, alpha 0.5, on the DeiT-B's distillation token; the teacher sees the student's mixed
  and augmented image resized to `teacher_size` (32 for CIFAR: their --teacher-size), out of its training
  distribution. The distillation cross-entropy is re-weighted by class (effective number, beta 0.9999) from
  epoch `drw` on (deferred re-weighting: CIFAR 1100 of 1200 epochs, ImageNet-LT 1200 of 1400); the class head
  keeps the plain cross-entropy. On CIFAR (--no-mixup-drw) mixup, cutmix and smoothing stop at the same step.
- optimisation: AdamW lr 5e-4 x 256 / 512 (their per-GPU batch 128 on 2 GPUs; 4 on ImageNet-LT), 4 gradient
  accumulation steps (batch 1024 / 2048 per update), weight decay 0.05, 5 warmup epochs, cosine to 1e-5.

dataset=imagenet: ImageNet-LT proper is Liu et al.'s fixed list (115.8k images, 1,280 to 5 per class), which
vitjax does not bundle; this config applies the exponential rule with imbalance 256 to imagenet2012 instead
(`input.long_tail` needs the split in memory: input.cache=True holds the encoded images, ~140 GB). Not run.
"""
import math

import numpy as np

from vitjax import config_utils
from vitjax.data import sources

DATASETS = ("cifar10", "imagenet")
STAGES = ("student", "teacher")
# dataset: (imbalance, train images per class, epochs, drw epoch, per-update batch, lr, teacher, teacher_size)
PAPER = {
    "cifar10": dict(imbalance=100, per_class=5000, classes=10, epochs=1200, drw=1100, batch_size=1024, lr=2.5e-4,
                    teacher="resnet18", teacher_size=32, mixup_in_drw=False),
    "imagenet": dict(imbalance=256, per_class=1280, classes=1000, epochs=1400, drw=1200, batch_size=2048, lr=5e-4,
                     teacher="resnet50", teacher_size=224, mixup_in_drw=True),
}
RUNLOCAL_RESNET = dict(num_classes=10, img_size=16, in_chans=1, widths=(16, 32, 64, 128), depths=(2, 2, 2, 2))
RUNLOCAL_DEIT = dict(variant="mu/4", num_classes=10, img_size=16, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                     mlp_dim=64, distilled=True)


def _cifar_input(imbalance: float, data_dir) -> dict:
    """Returns CIFAR-10 at 224 with DeiT's augmentation (their build_transform_deit at input size 224)."""
    config = config_utils.imagenet_input(
        data_dir, randaug="randaug(2, 9, magnitude_std=0.5, increasing=True)", label_smoothing=0.1, mixup=0.8,
        cutmix=1.0, random_erasing=0.25)
    config.update(dataset="cifar10", eval_split="test",
                  pp_eval="decode|resize(224, method='bicubic', antialias=True)|normalize()")
    config["long_tail"] = dict(imbalance=float(imbalance), seed=0)
    return config


def get_config(arg=None):
    """Returns the DeiT-LT config; arguments: stage (student|teacher), dataset (cifar10|imagenet), imbalance,
    teacher, teacher_init, data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, stage="student", dataset="cifar10", imbalance=0.0, teacher="",
                                 teacher_init="", data_dir="", runlocal=False,
                                 choices=dict(stage=STAGES, dataset=DATASETS))
    paper = dict(PAPER[arg.dataset])
    imbalance = arg.imbalance or paper["imbalance"]
    teacher = arg.teacher or paper["teacher"]
    data_dir = arg.data_dir or None
    config = config_utils.default_config()
    config.seed = 0
    if arg.dataset == "cifar10":
        config.input = _cifar_input(imbalance, data_dir)
    else:
        config.input = config_utils.imagenet_input(
            data_dir, randaug="randaug(2, 9, magnitude_std=0.5, increasing=True)", label_smoothing=0.1, mixup=0.8,
            cutmix=1.0, random_erasing=0.25)
        config.input.update(long_tail=dict(imbalance=float(imbalance), seed=0), cache=True)
    num_train = int(sources.long_tail_counts(np.full(paper["classes"], paper["per_class"]), imbalance).sum())
    steps_per_epoch = num_train / paper["batch_size"]

    config.batch_size = paper["batch_size"]
    config.eval_batch_size = 1000
    config.total_steps = math.ceil(paper["epochs"] * steps_per_epoch)
    config.optim.name = "adamw"
    config.optim.lr = paper["lr"]
    config.optim.grad_accum_steps = 4
    config.optim.b1, config.optim.b2, config.optim.eps = 0.9, 0.999, 1e-8
    config.optim.weight_decay = 0.05
    config.optim.warmup_steps = math.ceil(5 * steps_per_epoch)
    config.optim.warmup_init_lr = 1e-6
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-5
    drw_step = math.ceil(paper["drw"] * steps_per_epoch)

    config.log_every_steps = 50
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 2

    teacher_model = dict(num_classes=paper["classes"])
    if arg.runlocal:
        teacher_model = dict(RUNLOCAL_RESNET)
        config.input = dict(config_utils.digits_input(16, padding=1, label_smoothing=0.1),
                            mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5),
                            long_tail=dict(imbalance=float(arg.imbalance or 10), seed=0))
        config_utils.runlocal_schedule(config, batch_size=64, total_steps=200, warmup_steps=10)
        config.optim.lr = 2e-3
        config.optim.grad_accum_steps = 1
        drw_step = 150

    if arg.stage == "teacher":
        # Cross-entropy + SAM around SGD (their teachers: PaCo + SAM, SGD); the teacher sees plain crops.
        config.model_name = teacher
        config.model = teacher_model
        config.objective = "supervised"
        plain_input = {key: value for key, value in config.input.items() if key != "mixup"}
        config.input = dict(plain_input, random_erasing=0.0, label_smoothing=0.0)
        config.optim.name = "sam"
        config.optim.sam_base = "sgd"
        config.optim.sam_rho = 0.05
        config.optim.momentum = 0.9
        config.optim.lr = 0.1
        config.optim.weight_decay = 5e-4
        config.optim.grad_accum_steps = 1
        # A common CIFAR ResNet schedule (200 epochs of 128, cosine), not PaCo's 400 epochs.
        config.batch_size = 128
        config.total_steps = math.ceil(200 * num_train / 128)
        config.optim.warmup_steps = math.ceil(5 * num_train / 128)
        config.optim.min_lr = 0.0
        if arg.runlocal:
            config_utils.runlocal_schedule(config, batch_size=64, total_steps=300, warmup_steps=10)
            config.optim.sam_base = "adamw"  # the quickstart's optimizer: SGD needs many more steps on the digits
            config.optim.lr = 2e-3
            config.optim.weight_decay = 0.05
        return config

    config.model_name = "vit"
    config.model = dict(variant="B/16", num_classes=paper["classes"], img_size=224, drop_path_rate=0.1,
                        distilled=True, dtype="bfloat16")
    config.objective = "distill"
    config.objective_kwargs = dict(
        teacher=teacher, teacher_model=teacher_model, teacher_init=arg.teacher_init or None,
        distillation_type="hard", alpha=0.5, tau=1.0, class_balance_beta=0.9999, drw_step=drw_step,
        teacher_size=paper["teacher_size"])
    if not paper["mixup_in_drw"] or arg.runlocal:
        config.input.mixup.stop_step = drw_step
    if arg.runlocal:
        config.model = dict(RUNLOCAL_DEIT)
        config.objective_kwargs.update(teacher="resnet18", teacher_size=None,
                                       teacher_init=arg.teacher_init or "/tmp/deit_lt_teacher")
    return config
