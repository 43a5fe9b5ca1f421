r"""Quickstart: a small ViT on the bundled digits (scikit-learn's 8x8 handwritten digits), on CPU.

    python -m vitjax.main --config=configs/digits_vit.py --workdir=/tmp/digits

Expected: final test top-1 about 98% (>= 95%) on the 360 test images, in about a minute on
2 CPU cores. `:runlocal` shrinks model and run to a smoke test of seconds (accuracy near chance).

The data are 1,437 train / 360 test grayscale 8x8 images (`vitjax.data.digits`, offline).
The model sees the images upsampled to 16x16 in 4x4 patches (16 tokens + a class token), width
64, depth 4; it trains for 800 steps of 128 images (~71 epochs) with AdamW, small random shifts,
drop-path 0.1 and label smoothing 0.1.

Config layout (every run config has these keys, see `vitjax/config_utils.py`; start from
`config_utils.default_config()` so that each one can be overridden with --config.KEY=VALUE):
  seed                    one seed: init, dropout, data order and augmentation.
  model_name, model       `vitjax.models.create(model_name, **model)`; model.dtype="bfloat16"
                          computes in bf16 with fp32 master weights.
  objective, objective_kwargs   what is learned (`vitjax.objectives`; "supervised" here).
  input                   the data pipeline (`vitjax.data`): dataset, splits, pp_train / pp_eval
                          ops (`vitjax/data/ops.py`), label_smoothing, mixup, random_erasing.
  batch_size, eval_batch_size, total_steps | total_epochs.
  optim                   name (adamw | sgd | lars | lamb), lr or blr (lr = blr * batch / 256),
                          schedule (cosine | linear | constant), warmup_steps | warmup_epochs,
                          min_lr, weight_decay, b1, b2, eps, momentum, clip_grad_norm,
                          layer_decay, grad_accum_steps, frozen, no_decay, mu_dtype.
  mesh, sharding_rules    device mesh {data, fsdp, model} (-1 fills) and logical-axis rules.
  log_every_steps, eval_every_steps, checkpoint_every_steps, keep_checkpoints,
  checkpoint_async, progress_bar.
"""
from vitjax import config_utils


def get_config(arg=None):
    """Returns the quickstart config; arg: "runlocal" for a seconds-long smoke run."""
    arg = config_utils.parse_arg(arg, runlocal=False)
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = "vit"
    config.model = dict(variant="mu/4", num_classes=10, img_size=16, in_chans=1,
                        embed_dim=64, depth=4, num_heads=4, mlp_dim=128, drop_path_rate=0.1)
    config.objective = "supervised"

    config.input = dict(
        dataset="digits",
        train_split="train",
        eval_split="test",
        # Upsampled to 16x16 and shifted by up to half an original pixel: with 1,437 train images
        # a ViT needs the augmentation (and drop-path, label smoothing) not to overfit.
        pp_train="decode(channels=1)|resize(16)|random_crop(16, padding=1)|value_range(-1, 1)",
        pp_eval="decode(channels=1)|resize(16)|value_range(-1, 1)",
        label_smoothing=0.1,
    )

    config.batch_size = 128
    config.eval_batch_size = 120
    config.total_steps = 800

    config.optim.name = "adamw"
    config.optim.blr = 4e-3  # lr = 2e-3 at batch 128
    config.optim.weight_decay = 0.05
    config.optim.warmup_steps = 50
    config.optim.schedule = "cosine"

    config.log_every_steps = 50
    config.eval_every_steps = 400
    config.checkpoint_every_steps = 400
    config.keep_checkpoints = 2  # a damaged step 800 falls back to step 400

    if arg.runlocal:  # also the tests' model: seconds to compile and run
        config.model.update(embed_dim=32, depth=2, num_heads=2, mlp_dim=64, drop_path_rate=0.0)
        config.total_steps = 10
        config.batch_size = 32
        config.optim.warmup_steps = 2
        config.log_every_steps = 5
        config.eval_every_steps = 0
        config.checkpoint_every_steps = 0
        config.keep_checkpoints = 1  # one checkpoint, at the end: nothing to fall back to
    return config
