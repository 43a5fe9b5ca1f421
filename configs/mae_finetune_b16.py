r"""Fine-tuning an MAE-pretrained ViT on ImageNet-1k (He et al. 2021, Appendix A.1, Table 9).

    python -m vitjax.main --config=configs/mae_finetune_b16.py:init_from=/ckpt/mae_b16 --workdir=/ckpt/ft_b16
    python -m vitjax.main --config=configs/mae_finetune_b16.py:variant=L/16,init_from=mae_pretrain_vit_large.pth \
        --workdir=/ckpt/ft_l16
    python -m vitjax.main --config=configs/mae_finetune_b16.py:runlocal,init_from=/tmp/mae_local --workdir=/tmp/ft

Expected top-1 on ImageNet val from the released 1600-epoch encoders (paper Table 3): ViT-B/16 83.6%,
ViT-L/16 85.9%, ViT-H/14 86.9%.

`init_from`: a vitjax workdir of an `mae` run (configs/mae_b16.py), or an official checkpoint
(`mae_pretrain_vit_base.pth`, ...; read by vitjax.convert.mae). Empty trains from scratch.
The recipe: global average pooling + fc_norm (the encoder's final norm is dropped), head
trunc_normal(2e-5), layer-wise lr decay, drop path, AdamW (0.9, 0.999), weight decay 0.05,
lr = blr x batch / 256, 5 warmup epochs then cosine to 1e-6, batch 1024, random-resized crop
(bicubic) + flip + RandAugment (m9, mstd 0.5), mixup 0.8 / cutmix 1.0, label smoothing 0.1,
random erasing 0.25; eval: resize 256 (bicubic), centre crop 224.
Per variant (the official FINETUNE.md): B/16 blr 5e-4, layer decay 0.65, drop path 0.1, 100 epochs;
L/16 blr 1e-3, 0.75, 0.2, 50 epochs; H/14 blr 1e-3, 0.75, 0.3, 50 epochs.
"""
from vitjax import config_utils

PAPER = {
    "B/16": dict(blr=5e-4, layer_decay=0.65, drop_path_rate=0.1, epochs=100.0),
    "L/16": dict(blr=1e-3, layer_decay=0.75, drop_path_rate=0.2, epochs=50.0),
    "H/14": dict(blr=1e-3, layer_decay=0.75, drop_path_rate=0.3, epochs=50.0),
}


def get_config(arg=None):
    """Returns the fine-tuning config; arguments: variant, init_from, data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="B/16", init_from="", runlocal=False, data_dir="",
                                 choices=dict(variant=tuple(PAPER)))
    recipe = PAPER[arg.variant]
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = "vit"
    config.model = dict(variant=arg.variant, img_size=224, num_classes=1000, global_pool="avg", fc_norm=True,
                        drop_path_rate=recipe["drop_path_rate"], dtype="bfloat16")
    config.objective = "mae_finetune"
    config.objective_kwargs = dict(head_init_std=2e-5)
    config.init_from = arg.init_from or None  # also --config.init_from=PATH

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    # timm's create_transform(is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic")
    # and DeiT's regularisation; eval: resize 256 (bicubic), centre crop 224.
    config.input = config_utils.imagenet_input(
        data_dir, randaug="randaug(2, 9, magnitude_std=0.5, increasing=True)",
        label_smoothing=0.1, mixup=0.8, cutmix=1.0, random_erasing=0.25)

    config.batch_size = 1024
    config.total_epochs = recipe["epochs"]
    config.optim.name = "adamw"
    config.optim.blr = recipe["blr"]
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.05
    config.optim.layer_decay = recipe["layer_decay"]
    config.optim.warmup_epochs = 5.0
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-6

    config.log_every_steps = 100
    config.eval_every_steps = 2500
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model = dict(config_utils.MAE_RUNLOCAL_ENCODER, num_classes=10, global_pool="avg", fc_norm=True,
                            drop_path_rate=0.1)
        config.input = config_utils.digits_input(padding=1, label_smoothing=0.1)
        config_utils.runlocal_schedule(config)
        config.optim.blr = 2e-3
    return config
