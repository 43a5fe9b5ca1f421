r"""Activator (Abdullah & Aydin, 2024, "Activator: GLU Activation Function as the Core Component of a Vision
Transformer"), the official Abdullah-88/Activator recipe. The paper trains on CIFAR-10 only (it has no ImageNet
recipe), so the default dataset here is CIFAR-10 (TFDS `cifar10`); `dataset=imagenet2012` runs the same recipe on
ImageNet-1k at 224 px (not in the paper: the patch grid is then 56 x 56).

    python -m vitjax.main --config=configs/activator_i1k.py --workdir=/ckpt/activator
    python -m vitjax.main --config=configs/activator_i1k.py:variant=activator_only_geglu --workdir=/ckpt/act_geglu
    python -m vitjax.main --config=configs/activator_i1k.py:runlocal --workdir=/tmp/activator_local

Expected: the paper's CIFAR-10 test accuracies for Activator and its only-GEGLU form (not re-measured here).

Recipe (the official train.py / train_only_GEGLU.py): Adam (no weight decay), constant lr 1e-3, batch 128, 100
epochs, cross-entropy without label smoothing, no augmentation, images mapped to [-1, 1] (Normalize(0.5, 0.5));
the model's MLP dropout is 0.5 (the only-GEGLU model has no dropout). The official code has no warm-up; here a
constant schedule after 1 warm-up epoch is the nearest (the trainer's "constant" keeps a linear warm-up).
`runlocal` trains a width-32 two-block Activator on 8 px digits (patch 2), 100 steps on a CPU.
"""
from vitjax import config_utils

VARIANTS = ("activator", "activator_only_geglu")
DATASETS = ("cifar10", "imagenet2012")


def get_config(arg=None):
    """Returns the Activator config; arguments: variant (activator, activator_only_geglu), dataset (cifar10,
    imagenet2012), data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="activator", dataset="cifar10", data_dir="", runlocal=False,
                                 choices=dict(variant=VARIANTS, dataset=DATASETS))
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = arg.variant
    dropout = 0.0 if arg.variant == "activator_only_geglu" else 0.5
    config.objective = "supervised"
    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    if arg.dataset == "cifar10":
        config.model = dict(num_classes=10, img_size=32, drop_rate=dropout)
        config.input = dict(dataset="cifar10", data_dir=data_dir, train_split="train", eval_split="test",
                            pp_train="decode|value_range(-1, 1)", pp_eval="decode|value_range(-1, 1)")
    else:
        config.model = dict(num_classes=1000, img_size=224, drop_rate=dropout)
        config.input = config_utils.imagenet_input(data_dir, normalize="value_range(-1, 1)")

    config.batch_size = 128
    config.total_epochs = 100.0
    config.optim.name = "adamw"
    config.optim.blr = 1e-3 * 256 / 128  # lr = blr * batch / 256 = 1e-3 at batch 128
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.0
    config.optim.warmup_epochs = 1.0
    config.optim.schedule = "constant"

    config.log_every_steps = 100
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 2000
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model = dict(num_classes=10, img_size=8, patch_size=2, in_chans=1, embed_dim=32, hidden_dim=64,
                            depth=2, drop_rate=0.1 if dropout else 0.0)
        config.input = config_utils.digits_input(8)
        config_utils.runlocal_schedule(config)
        config.optim.blr = 1.2e-2  # lr 3e-3 at batch 64
    return config
