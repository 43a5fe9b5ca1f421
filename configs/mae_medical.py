r"""MAE pretraining on chest X-rays (Xiao et al., "Delving into Masked Autoencoders for Multi-Label Thorax Disease
Classification", WACV 2023; the commands of PRETRAIN.md in github.com/lambert-x/medical_mae, whose settings this
config follows). A config of the `mae` objective: only the recipe differs from configs/mae_b16.py.

    python -m vitjax.main --config=configs/mae_medical.py --workdir=/ckpt/mae_cxr_s16
    python -m vitjax.main --config=configs/mae_medical.py:variant=B/16 --workdir=/ckpt/mae_cxr_b16
    python -m vitjax.main --config=configs/mae_medical.py:runlocal --workdir=/tmp/mae_medical_local  # digits, CPU

Expected: the X-ray runs were not made here (no accelerator budget, and the datasets need manual downloads);
the paper reports its results after fine-tuning on the multi-label tasks (e.g. ChestX-ray14 mean AUC), which this
config does not reproduce by itself (fine-tune with configs/finetune.py and `init_from`). `:runlocal` trains 100
steps on the bundled digits on a CPU in under a minute (48 s); its loss falls from 1.67 to 0.52.

The recipe: ViT-S/16 (decoder 512 wide x 2 deep x 16 heads; B/16: x 8 deep), mask ratio 0.90 (random masking),
pixel targets not normalised per patch (the official commands do not pass --norm_pix_loss), 800 epochs,
batch 2048 (256 x 8 GPUs), AdamW (0.9, 0.95), lr 1.5e-4 x batch / 256, weight decay 0.05 (not on biases and
norms, on the cls and mask tokens), 40 warmup epochs then cosine to 0; random-resized crop of scale (0.5, 1)
bicubic + horizontal flip, normalised by the dataset's mean / std (NIH ChestX-ray14: 0.5056 / 0.252 per channel;
CheXpert and MIMIC-CXR: ImageNet's). Not available here: the concatenation of several datasets in one run (the
paper pretrains on CheXpert + ChestX-ray14 (+ MIMIC-CXR for B/16); here one TFDS dataset), and the repository's
optional heatmap-weighted masking (`--mask_strategy heatmap_weighted`, not used by the published commands).

Arguments: variant=S/16 | B/16; dataset=TFDS name (default chexpert, manual download); data_dir=PATH;
nih_stats (normalise with ChestX-ray14's mean / std instead of ImageNet's); runlocal.
"""
from vitjax import config_utils

VARIANTS = ("S/16", "B/16")
DECODER_DEPTH = {"S/16": 2, "B/16": 8}
NIH_MEAN, NIH_STD = (0.5056,) * 3, (0.252,) * 3


def get_config(arg=None):
    """Returns the medical MAE pretraining config; see the module docstring for the arguments."""
    arg = config_utils.parse_arg(arg, variant="S/16", dataset="chexpert", data_dir="", nih_stats=False,
                                 runlocal=False, choices=dict(variant=VARIANTS))
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = "vit"
    config.model = dict(variant=arg.variant, img_size=224, dtype="bfloat16")
    config.objective = "mae"
    config.objective_kwargs = dict(mask_ratio=0.9, decoder_embed_dim=512, decoder_depth=DECODER_DEPTH[arg.variant],
                                   decoder_num_heads=16, norm_pix_loss=False)

    normalize = f"normalize(mean={NIH_MEAN}, std={NIH_STD})" if arg.nih_stats else "normalize()"
    config.input = config_utils.imagenet_input(arg.data_dir or None, crop_scale=(0.5, 1.0), normalize=normalize)
    config.input.update(dataset=arg.dataset)  # chexpert: train / validation

    config.batch_size = 2048
    config.total_epochs = 800.0

    config.optim.name = "adamw"
    config.optim.blr = 1.5e-4
    config.optim.b1 = 0.9
    config.optim.b2 = 0.95
    config.optim.weight_decay = 0.05
    config.optim.warmup_epochs = 40.0
    config.optim.schedule = "cosine"
    config.optim.min_lr = 0.0
    # timm's add_weight_decay without a skip list: every >= 2-D param decays, the cls and mask tokens too.
    config.optim.no_decay = ()

    config.log_every_steps = 100
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 5000
    config.keep_checkpoints = 2

    if arg.runlocal:
        # The bundled digits (8x8 gray), 2x2 patches: 0.9 of 16 patches removed leaves 1 visible.
        config.model = dict(config_utils.MAE_RUNLOCAL_ENCODER)
        config.objective_kwargs.update(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
        config.input = config_utils.digits_input(padding=1)
        config_utils.runlocal_schedule(config)
        config.optim.blr = 1.5e-3
    return config
