r"""SatMAE++ pretraining (Noman et al., CVPR 2024, "Rethinking Transformers Pre-training for Multi-Spectral
Satellite Imagery"; official code github.com/techmn/satmae_pp, whose README commands and `main_pretrain.py`
defaults this config follows).

    python -m vitjax.main --config=configs/satmae_pp.py --workdir=/ckpt/satmae_sentinel           # eurosat/all
    python -m vitjax.main --config=configs/satmae_pp.py:dataset=fmow_sentinel --workdir=...       # your TFDS build
    python -m vitjax.main --config=configs/satmae_pp.py:kind=rgb --workdir=/ckpt/satmae_rgb         # eurosat/rgb
    python -m vitjax.main --config=configs/satmae_pp.py:runlocal --workdir=/tmp/satmae_local        # digits, CPU

Expected: the full runs were not made here (no accelerator budget). The official README (its model table)
reports 63.23% top-1 on fMoW-Sentinel and 78.14% on fMoW-RGB after fine-tuning their pretrained ViT-L (the
paper's fMoW tables); fMoW-Sentinel and fMoW-RGB are not in TFDS, so the default dataset is TFDS `eurosat/all`
(the same 13 Sentinel-2 bands in the same order, 64 px) or `eurosat/rgb`; name your own TFDS build with
`dataset=` (image feature `image_key=`). `:runlocal` pretrains on the bundled digits with 5 synthetic bands
(`synthetic_bands`), two band groups, 8 px at the encoder (32 px loaded: 2x and 4x targets), 100 steps in about
a minute on 2 CPU cores; its loss falls (tests/test_satmae.py checks it).

Recipe, multi-spectral (README "FMoW-Sentinel / Pretraining"): group-channel ViT-L/8 at 96 px, bands B1, B9,
B10 dropped (`--dropped_bands 0 9 10`) and the other 10 grouped (0, 1, 2, 6) (3, 4, 5, 7) (8, 9), group
embedding 256 (decoder 128), masking independent across groups at ratio 0.75, decoder 512 x 8 x 16 heads,
pixel targets not normalised, two up-sampling blocks (192 and 384 px; the loader crops at 4 x 96 = 384 and
halves twice), loss 0.6 MSE + 0.4 x (0.5 L1 at 2x + 0.5 L1 at 4x); AdamW (0.9, 0.95), weight decay 0.05 (every
>= 2-D param, as timm's add_weight_decay), blr 1e-4 x batch / 256 with batch 16 x 16 accumulation x 8 GPUs = 2048,
50 epochs, 20 warmup, half-cycle cosine to 0; data: SentinelNormalize (mean +- 2 std to [0, 255], uint8),
random-resized crop 384 scale (0.6, 1) bicubic, flip.
Recipe, RGB (README "FMoW-RGB / Pretraining"): the plain MAE ViT-L/16 at 224 px, one up-sampling block (448 px),
loss 0.6 MSE + 0.4 L1 at 2x, lr 7e-4 absolute, weight decay 0.3, batch 64 x 32 x 8 = 16384, 800 epochs, 20 warmup;
random-resized crop 448 scale (0.2, 1) bicubic, flip, normalised with their fMoW-RGB mean / std.

Arguments: kind=sentinel | rgb; dataset=TFDS name (default eurosat/all | eurosat/rgb); image_key (default
sentinel2 | image); data_dir=PATH; runlocal.
"""
from vitjax import config_utils

KINDS = ("sentinel", "rgb")
SENTINEL_GROUPS = ((0, 1, 2, 6), (3, 4, 5, 7), (8, 9))
# Their CustomDatasetFromImages statistics of fMoW-RGB.
FMOW_RGB_MEAN = (0.4182007312774658, 0.4214799106121063, 0.3991275727748871)
FMOW_RGB_STD = (0.28774282336235046, 0.27541765570640564, 0.2764017581939697)


def get_config(arg=None):
    """Returns the SatMAE++ pretraining config; see the module docstring for the arguments."""
    arg = config_utils.parse_arg(arg, kind="sentinel", dataset="", image_key="", data_dir="", runlocal=False,
                                 choices=dict(kind=KINDS))
    sentinel = arg.kind == "sentinel"
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = "vit"
    config.objective = "satmae"
    # The encoder: sin-cos position embeddings and xavier init are the objective's defaults.
    if sentinel:
        size = 96
        config.model = dict(variant="L/16", patch_size=8, img_size=size, in_chans=10)
        config.objective_kwargs = dict(mask_ratio=0.75, channel_groups=SENTINEL_GROUPS, spatial_mask=False,
                                       group_embed_dim=256, decoder_group_embed_dim=128)
        load = 4 * size
        normalize = "sentinel_normalize|select_bands(drop=(0, 9, 10))"
        crop = f"inception_crop({load}, scale=(0.6, 1.0), method='bicubic')"
        eval_resize = f"resize({load}, method='bicubic')"
    else:
        size = 224
        config.model = dict(variant="L/16", img_size=size)
        config.objective_kwargs = dict(mask_ratio=0.75, channel_groups=None)
        load = 2 * size
        normalize = f"normalize(mean={FMOW_RGB_MEAN}, std={FMOW_RGB_STD})"
        crop = f"inception_crop({load}, scale=(0.2, 1.0), method='bicubic')"
        eval_resize = f"resize({load}, method='bicubic')"
    config.objective_kwargs.update(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                                   norm_pix_loss=False, mse_weight=0.6)

    dataset = arg.dataset or ("eurosat/all" if sentinel else "eurosat/rgb")
    if sentinel:   # float bands: normalise, drop, then crop
        pp_train, pp_eval = f"{normalize}|{crop}|flip_lr", f"{normalize}|{eval_resize}"
    else:          # uint8 RGB: crop, then normalise
        pp_train, pp_eval = f"decode|{crop}|flip_lr|{normalize}", f"decode|{eval_resize}|{normalize}"
    config.input = dict(dataset=dataset, data_dir=arg.data_dir or None,
                        image_key=arg.image_key or ("sentinel2" if sentinel else "image"),
                        # EuroSAT has one split: the last 10% serve the held-out reconstruction loss.
                        train_split="train[:90%]", eval_split="train[90%:]", pp_train=pp_train, pp_eval=pp_eval)

    config.batch_size = 2048 if sentinel else 16384
    config.total_epochs = 50.0 if sentinel else 800.0
    config.optim.name = "adamw"
    if sentinel:
        config.optim.blr = 1e-4
        config.optim.weight_decay = 0.05
    else:
        config.optim.blr = None
        config.optim.lr = 7e-4
        config.optim.weight_decay = 0.3
    config.optim.b1 = 0.9
    config.optim.b2 = 0.95
    config.optim.warmup_epochs = 20.0
    config.optim.schedule = "cosine"
    config.optim.min_lr = 0.0
    # timm's add_weight_decay without a skip list: the cls and mask tokens are decayed too (as MAE pretraining).
    config.optim.no_decay = ()

    config.log_every_steps = 100
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 2000
    config.keep_checkpoints = 2
    config.evals = dict(knn=dict(kind="knn", k=20, every_steps=0))

    if arg.runlocal:
        # The bundled digits (8x8 gray) as 5 synthetic bands in two groups, loaded at 32 px (4x the 8 px input).
        config.model = dict(variant="mu/2", img_size=8, in_chans=5, embed_dim=64, depth=2, num_heads=4, mlp_dim=128)
        config.objective_kwargs = dict(mask_ratio=0.75, channel_groups=((0, 1, 2), (3, 4)), group_embed_dim=16,
                                       decoder_embed_dim=32, decoder_group_embed_dim=8, decoder_depth=1,
                                       decoder_num_heads=4, proj_ratio=2)
        config.input = dict(dataset="digits", train_split="train", eval_split="test",
                            pp_train="decode(channels=1)|synthetic_bands(5)|resize(32)|random_crop(32, padding=2)"
                                     "|value_range(0, 1)",
                            pp_eval="decode(channels=1)|synthetic_bands(5)|resize(32)|value_range(0, 1)")
        config_utils.runlocal_schedule(config)
        config.optim.blr = None
        config.optim.lr = 2e-3
        config.optim.warmup_init_lr = 0.0
        config.evals = dict(knn=dict(kind="knn", k=20, every_steps=0))
    return config
