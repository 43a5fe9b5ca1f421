r"""Fine-tune any registered model from pretrained weights, on any TFDS dataset or the bundled digits.

    # a timm checkpoint on the bundled digits at 64 px, on a CPU (the default dataset)
    python -m vitjax.main --config=configs/finetune.py:model=vit_tiny_patch16_224 \
        --config.init_from=vit_tiny_patch16_224.pth --workdir=/tmp/ft_digits
    # a timm ViT-B/16 on CIFAR-100 at 224 px, 10 epochs
    python -m vitjax.main --config=configs/finetune.py:model=vit_base_patch16_224,dataset=cifar100,epochs=10 \
        --config.init_from=vit_base_patch16_224.safetensors --workdir=/ckpt/ft_c100
    # any run's workdir, a .msgpack from `python -m vitjax.convert`, or an official MAE file works as init_from
    python -m vitjax.main --config=configs/finetune.py:model=convnext_tiny,runlocal --config.init_from=... \
        --workdir=/tmp/ft_local

Expected: on the bundled digits, a ViT-Ti/16 from a timm checkpoint that saw only the digits 0-4
(experiments/finetune_digits.py makes one) reaches the top-1 in experiments/out/finetune_digits.md.
On ImageNet-pretrained weights, the recipe is the usual transfer one: BEiT / MAE-style layer-wise lr
decay 0.75, AdamW, short warmup, cosine, label smoothing 0.1, drop path 0.1, no mixup.

Arguments (`:key=value,...`):
  model       a registered name (vitjax.models.list_models()); its timm preprocessing (mean, std,
              interpolation, crop) comes with it (vitjax.models.pretrained_cfg).
  dataset     "digits" (bundled, 1 channel, shown to the model as RGB) or a TFDS name; datasets
              outside KNOWN_DATASETS need num_classes, train_split and eval_split.
  image_size  the fine-tuning resolution (0: digits 64, else the model's pretrained size); position
              embeddings are resampled to it on load.
  steps | epochs   run length (0 steps: use epochs; default digits 300 steps, else 10 epochs).
  batch_size, blr (lr = blr x batch / 256), layer_decay (1.0 turns it off), warmup_fraction,
  label_smoothing, drop_path, mixup (0: off; e.g. 0.8 with cutmix 1.0), data_dir, runlocal.
`config.init_from` (required for a fine-tune; without it the model trains from scratch) takes every
source `vitjax.weights` reads; the log shows a table of what was loaded, resampled and re-initialised.
"""
import math

from vitjax import config_utils, models

# TFDS classification datasets this config knows: classes, train split, eval split, image channels.
KNOWN_DATASETS = {
    "digits": (10, "train", "test", 1),
    "mnist": (10, "train", "test", 1),
    "cifar10": (10, "train", "test", 3),
    "cifar100": (100, "train", "test", 3),
    "imagenet2012": (1000, "train", "validation", 3),
    "imagenette": (10, "train", "validation", 3),
    "oxford_flowers102": (102, "train", "test", 3),
    "oxford_iiit_pet": (37, "train", "test", 3),
    "food101": (101, "train", "validation", 3),
    "dtd": (47, "train", "test", 3),
    "caltech101": (102, "train", "test", 3),
    "stanford_dogs": (120, "train", "test", 3),
    "svhn_cropped": (10, "train", "test", 3),
}


def get_config(arg=None):
    """Returns the fine-tuning config; see the module doc for the arguments."""
    arg = config_utils.parse_arg(
        arg, model="vit_tiny_patch16_224", dataset="digits", image_size=0, steps=0, epochs=0.0, batch_size=0,
        blr=1e-3, layer_decay=0.75, warmup_fraction=0.1, label_smoothing=0.1, drop_path=0.1, mixup=0.0,
        num_classes=0, train_split="", eval_split="", data_dir="", runlocal=False)
    entry = models.get_entry(arg.model)  # an unknown model fails here, naming the valid ones
    cfg = models.pretrained_cfg(arg.model)
    if arg.dataset in KNOWN_DATASETS:
        num_classes, train_split, eval_split, channels = KNOWN_DATASETS[arg.dataset]
    else:
        if not (arg.num_classes and arg.train_split and arg.eval_split):
            raise ValueError(f"Dataset {arg.dataset!r} is not one of {sorted(KNOWN_DATASETS)}: give num_classes=, "
                             "train_split= and eval_split= in the config arguments")
        num_classes, train_split, eval_split, channels = arg.num_classes, arg.train_split, arg.eval_split, 3
    num_classes = arg.num_classes or num_classes
    train_split, eval_split = arg.train_split or train_split, arg.eval_split or eval_split
    if arg.runlocal:  # the recipe on the bundled digits, seconds long
        num_classes, train_split, eval_split, channels = KNOWN_DATASETS["digits"]
    digits = arg.runlocal or arg.dataset == "digits"
    image_size = arg.image_size or (32 if arg.runlocal else 64 if digits else int(cfg["input_size"][-1]))

    config = config_utils.default_config()
    config.seed = 0
    config.model_name = arg.model
    model = dict(num_classes=num_classes, img_size=image_size)
    fields = models.module_fields(entry.module_class)
    if "drop_path_rate" in fields:
        model["drop_path_rate"] = arg.drop_path
    config.model = model
    config.objective = "supervised"

    data_dir = arg.data_dir or None
    if digits:
        # Gray 8x8 digits shown as RGB at the fine-tuning size, shifted by up to 1/16 of it (no flips: a
        # mirrored digit is another digit), normalised as the weights expect.
        method = f"method={cfg['interpolation']!r}"
        normalize = f"normalize(mean={tuple(cfg['mean'])}, std={tuple(cfg['std'])})"
        base = f"decode(channels=1)|gray_to_rgb|resize({image_size}, {method})"
        config.input = dict(dataset="digits", train_split=train_split, eval_split=eval_split,
                            pp_train=f"{base}|random_crop({image_size}, padding={max(1, image_size // 16)})|"
                                     f"{normalize}",
                            pp_eval=f"{base}|{normalize}", label_smoothing=arg.label_smoothing)
    else:
        from vitjax import data
        config.input = dict(dataset=arg.dataset, data_dir=data_dir, train_split=train_split, eval_split=eval_split,
                            pp_train=data.pretrained_pp(cfg, image_size=image_size, channels=channels, train=True),
                            pp_eval=data.pretrained_pp(cfg, image_size=image_size, channels=channels),
                            label_smoothing=arg.label_smoothing)
    if arg.mixup:
        config.input["mixup"] = dict(mixup_alpha=arg.mixup, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)

    config.batch_size = arg.batch_size or (64 if digits else 512)
    config.eval_batch_size = 120 if digits else 500
    if arg.steps or (digits and not arg.epochs):
        config.total_steps = arg.steps or 300
        config.optim.warmup_steps = max(1, int(math.ceil(arg.warmup_fraction * config.total_steps)))
    else:
        config.total_epochs = arg.epochs or 10.0
        config.optim.warmup_epochs = arg.warmup_fraction * config.total_epochs
    config.optim.name = "adamw"
    config.optim.blr = arg.blr
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.05
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-6
    if arg.layer_decay != 1.0:
        config.optim.layer_decay = arg.layer_decay

    config.log_every_steps = 20 if digits else 100
    config.eval_every_steps = 100 if digits else 1000
    config.checkpoint_every_steps = 100 if digits else 1000
    config.keep_checkpoints = 2

    if arg.runlocal:
        config_utils.runlocal_schedule(config, batch_size=16, total_steps=10, warmup_steps=2, log_every_steps=5)
    return config
