r"""SN-Net v2 on ImageNet-1k (Pan et al. 2023, "Stitched ViTs are Flexible Vision Backbones"): two DeiT-III anchors
stitched and trained together, one stitched network sampled per step (objective "snnet").

    # 1. the starting weights: both anchors' checkpoints, stitching layers by least squares on 100 train images
    python -c "import numpy as np, vitjax.convert.snnet as s, vitjax.convert.io as io; \
      io.save_variables('/ckpt/snnet_s_b_init.msgpack', s.from_anchors(['deit_3_small_224_21k.pth', \
      'deit_3_base_224_21k.pth'], 'snnetv2_deit3_s_b', images=np.load('imagenet_train_100.npy')))"
    # 2. training
    python -m vitjax.main --config=configs/snnet_deit.py --config.init_from=/ckpt/snnet_s_b_init.msgpack \
        --workdir=/ckpt/snnet_s_b
    python -m vitjax.main --config=configs/snnet_deit.py:variant=snnetv2_deit3_s_l --config.init_from=... --workdir=...
    python -m vitjax.main --config=configs/snnet_deit.py:runlocal --workdir=/tmp/snnet_local

Expected (paper, Fig. 1 / official README): a curve of ImageNet top-1 against FLOPs from DeiT-III-S to the larger
anchor, every stitch evaluated after training (`experiments/snnet_digits.py` does that on digits); not run here.

The recipe is the official `config/deit_stitching_snnetv2_{s_b,s_l,b_l}.json` with main.py's defaults: LAMB,
batch 64 per GPU x 8 = 512, lr 3e-5 unscaled (`unscale_lr`), warmup 5 epochs from 1e-7, cosine to 1e-5, 50 epochs,
weight decay 0.02, label smoothing 0.1, cutmix 1.0 without mixup, no random erasing, no repeated augmentation,
colour jitter 0.3, eval crop ratio 1.0, LoRA rank 64 on the stitching layers (their least-squares kernels frozen),
anchor drop path 0.05 / 0.15 (S/B), 0.05 / 0.4 (S/L), 0.15 / 0.4 (B/L); FLOPs groups 1 GFLOPs wide, sampled
uniformly. Differences: DeiT-III's 3-Augment and simple random crop are not vitjax ops, so the train
preprocessing is the inception crop, flip and colour jitter; the anchors' drop path grows linearly with depth
(vitjax's ViT) where DeiT-III's is constant; every configuration of the pool is compiled into the train step
(134 for S/L: a long first compile).
`runlocal` stitches two tiny digits ViTs (widths 32 and 64, depth 2) from scratch for 100 steps on a CPU, with AdamW, FLOPs groups weighted towards the costlier ones
(flops_sampling_k 0.25: from scratch, uniform draws over four networks split the few updates too thinly for the
loss to fall in 80 steps) and without layer scales (DeiT-III's 1e-4 start leaves the class
token image-independent for the first hundreds of steps: pretrained anchors do not have that problem).
"""
from vitjax import config_utils

_DEIT3 = dict(init_values=1e-4, no_embed_class=True)
_ANCHORS = {  # variant: (small, large, drop path of each)
    "snnetv2_deit3_s_b": ("S/16", "B/16", 0.05, 0.15),
    "snnetv2_deit3_s_l": ("S/16", "L/16", 0.05, 0.4),
    "snnetv2_deit3_b_l": ("B/16", "L/16", 0.15, 0.4),
}
VARIANTS = tuple(_ANCHORS)


def get_config(arg=None):
    """Returns the SN-Net v2 config; arguments: variant (snnetv2_deit3_s_b, _s_l, _b_l), data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="snnetv2_deit3_s_b", data_dir="", runlocal=False,
                                 choices=dict(variant=VARIANTS))
    config = config_utils.default_config()
    config.seed = 0

    small, large, drop_small, drop_large = _ANCHORS[arg.variant]
    config.model_name = arg.variant
    config.model = dict(num_classes=1000, lora_rank=64, anchor_options=(
        dict(variant=small, drop_path_rate=drop_small, **_DEIT3), dict(variant=large, drop_path_rate=drop_large, **_DEIT3)))
    config.objective = "snnet"
    config.objective_kwargs = dict(flops_gap=1.0, flops_sampling_k=None)

    data_dir = arg.data_dir or None
    config.input = config_utils.imagenet_input(data_dir, crop_pct=1.0, label_smoothing=0.1, mixup=0.0, cutmix=1.0)
    config.input.pp_train = config.input.pp_train.replace(
        "|flip_lr|", "|flip_lr|color_jitter(0.3, 0.3, 0.3, 0.0, probability=1.0)|")

    config.batch_size = 512
    config.total_epochs = 50.0
    config.optim.name = "lamb"
    config.optim.lr = 3e-5
    config.optim.weight_decay = 0.02
    config.optim.warmup_epochs = 5.0
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-5
    config.optim.warmup_init_lr = 1e-7

    config.log_every_steps = 100
    config.eval_every_steps = 2500
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model = dict(num_classes=10, img_size=16, in_chans=1, lora_rank=4, anchor_options=(
            dict(variant="mu/4", embed_dim=32, depth=2, num_heads=2, mlp_dim=128, no_embed_class=True),
            dict(variant="mu/4", embed_dim=64, depth=2, num_heads=4, mlp_dim=256, no_embed_class=True)))
        config.objective_kwargs = dict(flops_gap=0.0, flops_sampling_k=0.25)
        config.input = config_utils.digits_input(16, label_smoothing=0.1)
        config_utils.runlocal_schedule(config)
        # From scratch (no pretrained anchors here) the recipe's LAMB at 3e-5 barely moves in 100 steps: AdamW.
        config.optim.name = "adamw"
        config.optim.lr = 2e-3
        config.optim.warmup_init_lr = 0.0
    return config
