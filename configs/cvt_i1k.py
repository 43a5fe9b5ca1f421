r"""CvT on ImageNet-1k from scratch (Wu et al. 2021, "CvT: Introducing Convolutions to Vision Transformers").

    python -m vitjax.main --config=configs/cvt_i1k.py --workdir=/ckpt/cvt_13
    python -m vitjax.main --config=configs/cvt_i1k.py:variant=cvt_21 --workdir=/ckpt/cvt_21
    python -m vitjax.main --config=configs/cvt_i1k.py:runlocal --workdir=/tmp/cvt_local

Expected top-1 on ImageNet val at 224 (paper Table 4): CvT-13 81.6%, CvT-21 82.5%.
(The 384 numbers, 83.0% / 83.3%, fine-tune these at 384; CvT-W24's 87.7% needs ImageNet-22k.)

The recipe, from the official configs (experiments/imagenet/cvt/cvt-{13,21}-224x224.yaml) and Sec. 4.1:
AdamW (0.9, 0.999), total batch 2048, lr 2e-3 (0.00025 per 256-image GPU batch x 8 GPUs), cosine
to 1e-5 after 5 warmup epochs (from 1e-6), 300 epochs, weight decay 0.05 (CvT-13) / 0.1 (CvT-21),
not on norms and biases; stochastic depth 0.1 in the last stage only; timm's augmentation:
random-resized crop (bicubic) + flip + RandAugment m9 mstd0.5, mixup 0.8 / cutmix 1.0 (switch 0.5),
label smoothing 0.1, random erasing 0.25; eval: resize 256 (bicubic), centre crop 224.
`runlocal` trains a shrunk CvT (8 / 4 / 2 token grids) on the bundled digits, resized to 32 px.
"""
from vitjax import config_utils

PAPER = {
    "cvt_13": dict(weight_decay=0.05, drop_path_rate=0.1),
    "cvt_21": dict(weight_decay=0.1, drop_path_rate=0.1),
}


def get_config(arg=None):
    """Returns the CvT config; arguments: variant (cvt_13 | cvt_21), data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, variant="cvt_13", data_dir="", runlocal=False,
                                 choices=dict(variant=tuple(PAPER)))
    recipe = PAPER[arg.variant]
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = arg.variant
    config.model = dict(num_classes=1000, drop_path_rate=recipe["drop_path_rate"], dtype="bfloat16")
    config.objective = "supervised"

    data_dir = arg.data_dir or None  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets, resolved when the run starts
    # timm's create_transform(is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic")
    # and DeiT's regularisation; eval: resize 256 (bicubic), centre crop 224.
    config.input = config_utils.imagenet_input(
        data_dir, randaug="randaug(2, 9, magnitude_std=0.5, increasing=True)",
        label_smoothing=0.1, mixup=0.8, cutmix=1.0, random_erasing=0.25)

    config.batch_size = 2048
    config.total_epochs = 300.0
    config.optim.name = "adamw"
    config.optim.lr = 2e-3
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.weight_decay = recipe["weight_decay"]
    # The official set_wd skips norms and biases (1-D, never decayed here) and the model's no_weight_decay
    # (the cls token), which the model declares.
    config.optim.warmup_epochs = 5.0
    config.optim.warmup_init_lr = 1e-6
    config.optim.schedule = "cosine"
    config.optim.min_lr = 1e-5

    config.log_every_steps = 100
    config.eval_every_steps = 2500
    config.checkpoint_every_steps = 2500
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model_name = "cvt_13"
        config.model = dict(num_classes=10, img_size=32, in_chans=1, embed_dims=(16, 32, 48), depths=(1, 1, 2),
                            num_heads=(1, 2, 3), drop_path_rate=0.1)
        config.input = dict(dataset="digits", train_split="train", eval_split="test",
                            pp_train="decode(channels=1)|random_crop(8, padding=1)|resize(32)|value_range(-1, 1)",
                            pp_eval="decode(channels=1)|resize(32)|value_range(-1, 1)",
                            label_smoothing=0.1)
        config_utils.runlocal_schedule(config)
        config.optim.lr = 2e-3
    return config
