r"""SparK pretraining of ConvNeXt-S on ImageNet-1k (Tian et al., ICLR 2023, "Designing BERT for Convolutional
Networks: Sparse and Hierarchical Masked Modeling"; official code github.com/keyu-tian/SparK, whose
`pretrain/` defaults this config follows: its `utils/arg_util.py`, `models/__init__.py` and README).

    python -m vitjax.main --config=configs/spark_convnext.py --workdir=/ckpt/spark_cnx_s
    python -m vitjax.main --config=configs/spark_convnext.py:variant=convnext_base --workdir=/ckpt/spark_cnx_b
    python -m vitjax.main --config=configs/spark_convnext.py:runlocal --workdir=/tmp/spark_local   # digits, CPU
    # then fine-tune the encoder (the run's `encoder` params load into the classifier):
    python -m vitjax.main --config=configs/finetune.py:model=convnext_small,dataset=imagenet2012 \
        --config.init_from=/ckpt/spark_cnx_s --workdir=/ckpt/spark_cnx_s_ft

Expected: the ImageNet run was not made here (no accelerator budget). The official README reports, after
its own fine-tuning recipe (not reproduced by this config), 84.1% top-1 for ConvNeXt-S, 84.8% for B and
85.4% for L at 224 px. `:runlocal` pretrains a four-stage ConvNeXt (dims 16-64, one block per stage) on the
bundled digits resized to 64 px (a 2 x 2 grid of 32 px patches, 2 kept) for 100 steps in about a minute on
2 CPU cores; its loss falls (tests/test_spark.py checks it).

The recipe (official defaults for ConvNeXts at 224 px): mask ratio 0.6 of the 32 px patches, densify norm a
sparse LayerNorm, decoder width 768; LAMB with betas (0.9, 0.999), lr = 2e-4 x batch / 256 (3.2e-3 at batch
4096), 40 warmup epochs from 0.005 x the peak, cosine to 0.001 x the peak, weight decay 0.04 (1-D params,
biases, mask tokens and layer scales undecayed), global gradient clipping at 5 (inside the official LAMB),
1600 epochs; drop path 0.2 (S), 0.3 (B), 0.4 (L) as the official `pretrain_default_model_kwargs`; random-
resized crop of scale (0.67, 1) bicubic + flip, ImageNet mean / std. Differences: the official weight decay
rises from 0.04 to 0.2 on a cosine, which vitjax's optimizer does not offer (constant 0.04 here); its BatchNorms
are synchronised across GPUs, as a sharded batch's are here.

Arguments: variant=convnext_small | convnext_base | convnext_large; data_dir=PATH (TFDS dir with
imagenet2012); runlocal.
"""
from vitjax import config_utils

VARIANTS = ("convnext_small", "convnext_base", "convnext_large")
DROP_PATH = dict(convnext_small=0.2, convnext_base=0.3, convnext_large=0.4)


def get_config(arg=None):
    """Returns the SparK pretraining config; see the module docstring for the arguments."""
    arg = config_utils.parse_arg(arg, variant="convnext_small", runlocal=False, data_dir="",
                                 choices=dict(variant=VARIANTS))
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = arg.variant
    config.model = dict(img_size=224, num_classes=0, drop_path_rate=DROP_PATH[arg.variant])
    config.objective = "spark"
    config.objective_kwargs = dict(mask_ratio=0.6, decoder_width=768, densify_norm="ln")

    config.input = config_utils.imagenet_input(arg.data_dir or None, crop_scale=(0.67, 1.0))
    config.batch_size = 4096
    config.total_epochs = 1600.0

    config.optim.name = "lamb"
    config.optim.blr = 2e-4
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.weight_decay = 0.04
    config.optim.warmup_epochs = 40.0
    config.optim.schedule = "cosine"
    peak = 2e-4 * config.batch_size / 256
    config.optim.warmup_init_lr = 0.005 * peak
    config.optim.min_lr = 0.001 * peak
    config.optim.clip_grad_norm = 5.0

    config.log_every_steps = 100
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 5000
    config.keep_checkpoints = 2
    config.evals = dict(knn=dict(kind="knn", k=20, every_steps=25000))

    if arg.runlocal:
        # The bundled digits (8x8 gray) resized to 64 px: the smallest image with more than one 32 px patch.
        config.model_name = "convnext_atto"
        config.model = dict(img_size=64, in_chans=1, num_classes=0, depths=(1, 1, 1, 1), dims=(16, 32, 48, 64))
        config.objective_kwargs.update(decoder_width=64)
        config.input = config_utils.digits_input(image_size=64, padding=4)
        config_utils.runlocal_schedule(config)
        config.optim.name = "adamw"
        config.optim.blr = None
        config.optim.lr = 5e-3
        config.optim.warmup_init_lr = 0.0
        config.optim.min_lr = 0.0
        config.evals = dict(knn=dict(kind="knn", k=20, every_steps=0))
    return config
