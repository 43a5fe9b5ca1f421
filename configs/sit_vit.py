r"""SiT pretraining of ViT-S/16 on ImageNet-1k (Atito, Awais, Kittler 2021, "SiT: Self-supervised vIsion
Transformer"; official code github.com/Sara-Ahmed/SiT, whose `main.py` defaults this config follows).

    python -m vitjax.main --config=configs/sit_vit.py --workdir=/ckpt/sit_s16
    python -m vitjax.main --config=configs/sit_vit.py:runlocal --workdir=/tmp/sit_local   # digits, CPU

Expected: the ImageNet run was not made here (no accelerator budget); fine-tune the encoder with
configs/finetune.py and `init_from` to compare with the paper. `:runlocal` trains 100 steps on the bundled
digits on 2 CPU cores; its loss (contrastive + L1 reconstruction) falls (tests/test_ssl_sit.py checks it).

The recipe (official defaults): two views per image (random-resized crop of scale (0.2, 1) bicubic, flip);
each corrupted by zeros over U(0.5, 0.5) of the image in pixel-aligned groups, or with probability 1/2
by 0.3 of it copied from another image; the student reconstructs the clean views from its final tokens
(L1 on the corrupted pixels, weight 1) and contrasts its projected class token (3-layer head, 4096 wide,
256 out, BatchNorm) with the momentum teacher's projection of the other clean view (temperature 0.2,
keys gathered over the batch axes); teacher momentum 0.996 rising to 1 on a cosine. AdamW, lr 5e-4
per 256 images, 10 warmup epochs, cosine to 1e-6, weight decay 0.04, clipping at 3, drop path 0.1,
800 epochs, batch 256 (64 on each of 4 GPUs, the README's command); views with colour jitter (p 0.8),
grey scale (p 0.2), blur (p 1 / 0.1) and solarisation (second view, p 0.2). Differences, which vitjax's
optimizer does not offer: the official weight decay rises to 0.1 on a cosine and its clipping is per
parameter tensor; the colour jitter applies its four parts in a fixed order (torchvision: a random one).

Arguments: variant=S/16 | B/16; data_dir=PATH (TFDS dir with imagenet2012); runlocal.
"""
from vitjax import config_utils

VARIANTS = ("S/16", "B/16")
IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
    """Returns the SiT pretraining config; see the module docstring for the arguments."""
    arg = config_utils.parse_arg(arg, variant="S/16", runlocal=False, data_dir="", choices=dict(variant=VARIANTS))
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = "vit"
    config.model = dict(variant=arg.variant, img_size=224, drop_path_rate=0.1, dtype="bfloat16")
    config.objective = "sit"
    config.objective_kwargs = dict(mask_ratio=0.5, corruption="zeros", replace_ratio=0.3, replace_prob=0.5, align=1,
                                   out_dim=256, hidden_dim=4096, num_layers=3, temperature=0.2, momentum=0.996,
                                   reconstruction_weight=1.0)

    # DINO's / SiT's two global views: crop, flip, colour jitter, grey scale; blur always on the first,
    # blur 0.1 and solarisation 0.2 on the second.
    crop = ("inception_crop(224, scale=(0.2, 1.0), method='bicubic', antialias=True)|flip_lr|"
            "color_jitter(0.4, 0.4, 0.2, 0.1, probability=0.8)|random_grayscale(0.2)")
    config.input = config_utils.imagenet_input(arg.data_dir or None)
    config.input["pp_train"] = (f'decode|views(1, "{crop}|gaussian_blur(1.0)|normalize()", '
                                f'1, "{crop}|gaussian_blur(0.1)|solarize(0.2)|normalize()")')
    config.batch_size = 256
    # Steps rather than epochs: the teacher's momentum schedule is counted in steps.
    config.total_steps = 800 * IMAGENET_TRAIN_IMAGES // config.batch_size

    config.optim.name = "adamw"
    config.optim.blr = 5e-4
    config.optim.weight_decay = 0.04
    config.optim.warmup_epochs = 10.0
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-6
    config.optim.clip_grad_norm = 3.0

    config.log_every_steps = 100
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 5000
    config.keep_checkpoints = 2
    config.evals = dict(knn=dict(kind="knn", k=20, every_steps=50000),
                        fewshot=dict(kind="fewshot", shots=(1, 5, 10, 25), every_steps=50000))

    if arg.runlocal:
        config.model = dict(config_utils.MAE_RUNLOCAL_ENCODER, drop_path_rate=0.0)
        config.objective_kwargs.update(max_block_fraction=0.5, hidden_dim=128, out_dim=32)
        config.input = config_utils.digits_input(padding=1)
        config.input["pp_train"] = ('decode(channels=1)|views(2, "random_crop(8, padding=1)|'
                                    'value_range(-1, 1)")')
        config_utils.runlocal_schedule(config)
        config.optim.blr = 2e-3
        config.evals = dict(knn=dict(kind="knn", k=20, every_steps=0))
    return config
