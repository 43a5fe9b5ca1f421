r"""CrossFormer / CrossFormer++ on ImageNet-1k from scratch (Wang et al., ICLR 2022, "CrossFormer: A Versatile Vision
Transformer Hinging on Cross-scale Attention"; CrossFormer++, TPAMI 2023), the official cheerss/CrossFormer recipe.

    python -m vitjax.main --config=configs/crossformer_i1k.py --workdir=/ckpt/crossformer_tiny
    python -m vitjax.main --config=configs/crossformer_i1k.py:variant=crossformer_pp_small --workdir=/ckpt/cfpp_s
    python -m vitjax.main --config=configs/crossformer_i1k.py:runlocal --workdir=/tmp/crossformer_local

Expected top-1 on ImageNet val (official README, 224 px): CrossFormer-T 81.5%, S 82.5%, B 83.4%, L 84.0%;
CrossFormer++-S 83.2%, B 84.2%, L 84.7%, H 84.9%.

The recipe is the official config.py (Swin's codebase) with each configs/*.yaml's drop path: AdamW (betas 0.9, 0.999,
eps 1e-8), batch 1024 (128 x 8 GPUs), lr 5e-4 * batch / 512 = 1e-3, 20 warmup epochs, cosine to 5e-6 * 2 = 1e-5,
300 epochs, weight decay 0.05, gradient clipping 5, RandAugment m9 mstd0.5 inc1, mixup 0.8 / cutmix 1.0, label smoothing
0.1, random erasing 0.25, bicubic; eval centre crop 224 of 256. Drop path 0.1 / 0.2 / 0.3 / 0.5 (T / S / B / L),
CrossFormer++ 0.2 / 0.3 / 0.5 / 0.5 (S / B / L / H).
`runlocal` trains a width-16 two-stage CrossFormer (SDA and LDA in stage 1, 32 px digits) for 100 steps on a CPU.
"""
from vitjax import config_utils

_DROP_PATH = {"crossformer_tiny": 0.1, "crossformer_small": 0.2, "crossformer_base": 0.3, "crossformer_large": 0.5,
              "crossformer_pp_small": 0.2, "crossformer_pp_base": 0.3, "crossformer_pp_large": 0.5,
              "crossformer_pp_huge": 0.5}
VARIANTS = tuple(_DROP_PATH)


def get_config(arg=None):
    """Returns the CrossFormer config; arguments: variant (an official model name), data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="crossformer_tiny", data_dir="", runlocal=False,
                                 choices=dict(variant=VARIANTS))
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = arg.variant
    config.model = dict(num_classes=1000, drop_path_rate=_DROP_PATH[arg.variant], dtype="bfloat16")
    config.objective = "supervised"

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    config.input = config_utils.imagenet_input(
        data_dir, randaug="randaug(2, 9, magnitude_std=0.5, increasing=True)", label_smoothing=0.1, mixup=0.8,
        cutmix=1.0, random_erasing=0.25)

    config.batch_size = 1024
    config.total_epochs = 300.0
    config.optim.name = "adamw"
    config.optim.blr = 5e-4 * 256 / 512  # lr = blr * batch / 256 = 1e-3 at batch 1024 (the official / 512 rule)
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 20.0
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-5
    config.optim.clip_grad_norm = 5.0

    config.log_every_steps = 100
    config.eval_every_steps = 2500
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model_name = "crossformer_tiny"
        config.model = dict(num_classes=10, img_size=32, in_chans=1, embed_dim=16, depths=(2, 1),
                            num_heads=(1, 2), group_sizes=(2, 2), intervals=(2, 1), merge_sizes=((2, 4),),
                            drop_path_rate=0.1)
        config.input = config_utils.digits_input(32, label_smoothing=0.1)
        config_utils.runlocal_schedule(config)
        config.optim.blr = 4e-3  # lr 1e-3 at batch 64
    return config
