r"""TNT on ImageNet-1k from scratch (Han et al. 2021, "Transformer in Transformer").

    python -m vitjax.main --config=configs/tnt_i1k.py --workdir=/ckpt/tnt_s
    python -m vitjax.main --config=configs/tnt_i1k.py:variant=tnt_b_patch16_224 --workdir=/ckpt/tnt_b
    python -m vitjax.main --config=configs/tnt_i1k.py:runlocal --workdir=/tmp/tnt_local

Expected top-1 on ImageNet val at 224 (paper Table 3): TNT-S 81.5%, TNT-B 82.9%.

The recipe is the paper's Table 2 (DeiT's): AdamW (0.9, 0.999), batch 1024, lr 1e-3, cosine decay after
5 warmup epochs, 300 epochs, weight decay 0.05, dropout 0, stochastic depth 0.1, label smoothing 0.1,
random-resized crop (bicubic) + flip + RandAugment m9 mstd0.5, mixup 0.8 / cutmix 1.0, random erasing 0.25;
inputs normalised with mean = std = 0.5 (timm's TNT config); eval: resize 248 (crop 0.9), centre crop 224.
Not reproduced: DeiT's repeated augmentation (the input pipeline has none).
`runlocal` trains a shrunk TNT on the bundled 8x8 digits: 2x2 patches of 4x4 px, each cut into 2x2 "pixels".
"""
import importlib.util
import os

from vitjax import config_utils

VARIANTS = ("tnt_s_patch16_224", "tnt_b_patch16_224")


def _imagenet_helpers():
    """Returns configs/mae_b16.py as a module: the shared TFDS data-dir default and ImageNet check."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mae_b16.py")
    spec = importlib.util.spec_from_file_location("_mae_b16_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    """Returns the TNT config; arguments: variant (tnt_s_patch16_224 | tnt_b_patch16_224), data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="tnt_s_patch16_224", data_dir="", runlocal=False,
                                 choices=dict(variant=VARIANTS))
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = arg.variant
    config.model = dict(num_classes=1000, drop_path_rate=0.1, dtype="bfloat16")
    config.objective = "supervised"

    helpers = _imagenet_helpers()
    data_dir = helpers.tfds_data_dir(arg.data_dir)
    half = "(0.5, 0.5, 0.5)"
    config.input = dict(
        dataset="imagenet2012",
        data_dir=data_dir,
        train_split="train",
        eval_split="validation",
        pp_train=("decode_jpeg_and_inception_crop(224, method='bicubic', antialias=True)|flip_lr"
                  f"|randaug(2, 9, magnitude_std=0.5, increasing=True)|normalize(mean={half}, std={half})"),
        pp_eval=("decode|resize_small(248, method='bicubic', antialias=True)|central_crop(224)"
                 f"|normalize(mean={half}, std={half})"),
        label_smoothing=0.1,
        mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5),
        random_erasing=0.25,
    )

    config.batch_size = 1024
    config.total_epochs = 300.0
    config.optim.name = "adamw"
    config.optim.lr = 1e-3
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.05
    config.optim.no_decay = ("cls_token", "patch_pos", "pixel_pos")  # timm's TNT.no_weight_decay
    config.optim.warmup_epochs = 5.0
    config.optim.warmup_init_lr = 1e-6
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-5

    config.log_every_steps = 100
    config.eval_every_steps = 2500
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model_name = "tnt_s_patch16_224"
        config.model = dict(num_classes=10, img_size=8, patch_size=4, first_stride=2, in_chans=1, embed_dim=64,
                            inner_dim=16, depth=2, num_heads_outer=4, num_heads_inner=2, drop_path_rate=0.1)
        config.input = dict(dataset="digits", train_split="train", eval_split="test",
                            # No random shifts: they slow this tiny run down more than its 100 steps allow.
                            pp_train="decode(channels=1)|value_range(-1, 1)",
                            pp_eval="decode(channels=1)|value_range(-1, 1)",
                            label_smoothing=0.1)
        config.batch_size = 64
        config.eval_batch_size = 120
        config.total_epochs = None
        config.total_steps = 100
        config.optim.lr = 2e-3
        config.optim.warmup_epochs = None
        config.optim.warmup_steps = 10
        config.log_every_steps = 10
        config.eval_every_steps = 0
        config.checkpoint_every_steps = 0
        config.keep_checkpoints = 1
    else:
        helpers.require_imagenet(data_dir, "configs/tnt_i1k.py")
    return config
