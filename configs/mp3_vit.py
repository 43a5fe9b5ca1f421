r"""MP3 (masked patch position prediction) pretraining of a ViT-B/16 on ImageNet-1k (Zhai et al. 2022,
"Position Prediction as an Effective Pretraining Strategy"; no official code).

    python -m vitjax.main --config=configs/mp3_vit.py --workdir=/ckpt/mp3_b16
    python -m vitjax.main --config=configs/mp3_vit.py:runlocal --workdir=/tmp/mp3_local   # digits, CPU

Expected: the ImageNet run was not made here; fine-tune with configs/finetune.py, `init_from` = the MP3
run and `init_from_skip=("^pos_embed$",)` (fine-tuning adds the position embeddings back). `:runlocal`
trains 100 steps on the bundled digits on 2 CPU cores; the position cross-entropy falls below log(16) and
the position top-1 rises (tests/test_ssl_mp3.py checks it).

The recipe is NOT checked against the paper's tables (they were not at hand when this was written): the
method as the paper describes it (no position embedding, keys / values of the masked patches dropped in
every layer, an N-way position classifier on every patch) with a masking ratio of 0.75 and an MAE-style
optimisation (AdamW (0.9, 0.95), weight decay 0.05, lr 1.5e-4 per 256, 40 warmup epochs, cosine, batch
4096, random-resized crop (0.2, 1) + flip). Check them against the paper before quoting results.

Arguments: variant=B/16 | S/16; data_dir=PATH (TFDS dir with imagenet2012); runlocal.
"""
from vitjax import config_utils

VARIANTS = ("B/16", "S/16")


def get_config(arg=None):
    """Returns the MP3 pretraining config; see the module docstring for the arguments."""
    arg = config_utils.parse_arg(arg, variant="B/16", runlocal=False, data_dir="", choices=dict(variant=VARIANTS))
    config = config_utils.default_config()
    config.seed = 0
    config.model_name = "vit"
    config.model = dict(variant=arg.variant, img_size=224, dtype="bfloat16")
    config.objective = "mp3"
    config.objective_kwargs = dict(mask_ratio=0.75)
    config.input = config_utils.imagenet_input(arg.data_dir or None, crop_scale=(0.2, 1.0))
    config.batch_size = 4096
    config.total_epochs = 400.0
    config.optim.name = "adamw"
    config.optim.blr = 1.5e-4
    config.optim.b1 = 0.9
    config.optim.b2 = 0.95
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 40.0
    config.optim.schedule = "cosine"
    config.log_every_steps = 100
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 5000
    config.keep_checkpoints = 2
    config.evals = dict(knn=dict(kind="knn", k=20, every_steps=25000))

    if arg.runlocal:
        config.model = dict(config_utils.MAE_RUNLOCAL_ENCODER)
        config.objective_kwargs = dict(mask_ratio=0.5)
        config.input = config_utils.digits_input(padding=1)
        config_utils.runlocal_schedule(config)
        config.optim.blr = 4e-3
        config.evals = dict(knn=dict(kind="knn", k=20, every_steps=0))
    return config
