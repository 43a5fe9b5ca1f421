r"""MAE pretraining of ViT-B/16 on ImageNet-1k (He et al. 2021, Appendix A.1, Table 8).

    python -m vitjax.main --config=configs/mae_b16.py --workdir=/ckpt/mae_b16
    python -m vitjax.main --config=configs/mae_b16.py:variant=L/16 --workdir=/ckpt/mae_l16
    python -m vitjax.main --config=configs/mae_b16.py:runlocal --workdir=/tmp/mae_local   # digits, CPU

Expected (paper, Table 3 / Fig. 7): 800 epochs of ViT-B/16 give 83.4% top-1 after fine-tuning with
configs/mae_finetune_b16.py (L/16: 85.4% at 800 epochs, 85.9% at 1600; H/14: 86.9% at 1600);
the train loss (norm_pix) falls to about 0.4. One epoch is 313 steps of 4096 images.

The recipe: mask ratio 0.75, encoder on the 49 visible patches (+ cls), decoder 512 wide x 8 deep
x 16 heads, norm_pix_loss, AdamW (0.9, 0.95), weight decay 0.05 (cls and mask tokens decayed, as
the official code does), lr = 1.5e-4 x batch / 256, 40 warmup epochs then cosine to 0, batch 4096,
random-resized crop scale (0.2, 1) bicubic + flip, no other augmentation.

Arguments: variant=B/16 | L/16 | H/14; data_dir=PATH (TFDS dir holding imagenet2012, else
$TFDS_DATA_DIR or ~/tensorflow_datasets); runlocal (the bundled digits on a CPU, a minute).
ImageNet must be prepared first (the tar files go to <data_dir>/downloads/manual/):
    tfds build imagenet2012 --data_dir=<data_dir>
"""
from vitjax import config_utils

VARIANTS = ("B/16", "L/16", "H/14")


def get_config(arg=None):
    """Returns the MAE pretraining config; see the module docstring for the arguments."""
    arg = config_utils.parse_arg(arg, variant="B/16", runlocal=False, data_dir="",
                                 choices=dict(variant=VARIANTS))
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = "vit"
    # The encoder: sin-cos position embeddings and xavier init are the mae objective's defaults.
    config.model = dict(variant=arg.variant, img_size=224, dtype="bfloat16")
    config.objective = "mae"
    config.objective_kwargs = dict(mask_ratio=0.75, decoder_embed_dim=512, decoder_depth=8,
                                   decoder_num_heads=16, norm_pix_loss=True)

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    # torchvision's RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=3) on PIL images, flip; no other
    # augmentation. Eval: resize 256 (bicubic), centre crop 224.
    config.input = config_utils.imagenet_input(data_dir, crop_scale=(0.2, 1.0))

    config.batch_size = 4096
    config.total_epochs = 800.0

    config.optim.name = "adamw"
    config.optim.blr = 1.5e-4
    config.optim.b1 = 0.9
    config.optim.b2 = 0.95
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 40.0
    config.optim.schedule = "cosine"
    config.optim.min_lr = 0.0
    # Deliberately not the model's no_weight_decay(): the official pretraining decays every >= 2-D param,
    # the cls and mask tokens included (timm's add_weight_decay without a skip list); the fixed position
    # embeddings are not params here.
    config.optim.no_decay = ()

    config.log_every_steps = 100
    config.eval_every_steps = 0            # the reconstruction loss on validation, at the end
    config.checkpoint_every_steps = 6250   # ~20 epochs
    config.keep_checkpoints = 2

    if arg.runlocal:
        # The bundled digits (8x8 gray) on a CPU: a tiny encoder on 2x2 patches, a minute.
        config.model = dict(config_utils.MAE_RUNLOCAL_ENCODER)
        config.objective_kwargs.update(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
        config.input = config_utils.digits_input(padding=1)
        config_utils.runlocal_schedule(config)
        config.optim.blr = 1.5e-3
    return config
