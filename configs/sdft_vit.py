r"""Self-distillation further pretraining of an MAE ViT-B/16 on a target dataset (Lee et al., "Self-Distillation
for Further Pre-training of Transformers", ICLR 2023; the official scripts run_pretrain.sh / run_selftrain.sh of
github.com/seanie12/self-distillation, whose settings this config follows).

    # round 1: further MAE pretraining from the pretrained MAE on the target data (the same recipe, objective mae)
    python -m vitjax.main --config=configs/sdft_vit.py:round=1,init_from=/ckpt/mae_pretrain_vit_base_full.pth \
        --workdir=/ckpt/flowers_round1
    # round 2: from the pretrained weights again, distilling the round-1 encoder
    python -m vitjax.main --config=configs/sdft_vit.py:init_from=/ckpt/mae_pretrain_vit_base_full.pth,\
teacher_init=/ckpt/flowers_round1 --workdir=/ckpt/flowers_round2
    python -m vitjax.main --config=configs/sdft_vit.py:runlocal,teacher_init=/tmp/mae_local \
        --workdir=/tmp/sdft_local   # digits, CPU; /tmp/mae_local from configs/mae_b16.py:runlocal

Expected: the target-data runs were not made here (no accelerator budget). The paper (Table 1) reports the
fine-tuned accuracy of round 2's encoder above that of round 1's on each of its six image datasets; fine-tune
either workdir with configs/finetune.py and `init_from`. `:runlocal` trains 100 steps on the bundled digits in
about 35 s of CPU (100 s wall on 2 shared cores); its loss falls (tests/test_ssl_sdft.py checks it).

The recipe (official scripts, both rounds): MAE ViT-B/16 (`facebook/vit-mae-base`, decoder included), mask ratio
0.75, norm_pix_loss, 20000 steps of 64 images, AdamW (0.9, 0.95) at lr 1.5e-4 (not scaled by batch), weight
decay 0.01 (not on biases and norms; on the cls and mask tokens), no warmup, linear decay to 0; images resized to
224 x 224 and normalised with ImageNet's mean and std, no augmentation. Round 2 adds the squared L2 distance of
the class token after the final norm (whole image, no mask) to the frozen round-1 encoder's, weight 1.

Arguments: round=1 | 2; dataset=TFDS name (the official six: aircraft, chest_xray, cub, dtd, stanford_dogs,
vgg_flower_102; default oxford_flowers102); data_dir=PATH; init_from=PATH (the pretrained MAE: an official
MAE .pth with decoder or a vitjax `mae` workdir); teacher_init=PATH (round 2: the round-1 workdir); runlocal.
"""
from vitjax import config_utils

ROUNDS = (1, 2)


def get_config(arg=None):
    """Returns the round-1 (mae) or round-2 (sdft) config; see the module docstring for the arguments."""
    arg = config_utils.parse_arg(arg, round=2, dataset="oxford_flowers102", data_dir="", init_from="",
                                 teacher_init="", runlocal=False, choices=dict(round=ROUNDS))
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = "vit"
    config.model = dict(variant="B/16", img_size=224, dtype="bfloat16")
    config.objective = "mae" if arg.round == 1 else "sdft"
    config.objective_kwargs = dict(mask_ratio=0.75, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                                   norm_pix_loss=True)
    if arg.round == 2:
        config.objective_kwargs.update(teacher_init=arg.teacher_init or None, distill_weight=1.0)
    config.init_from = arg.init_from or None

    # The official loader: the ViT-MAE image processor (bilinear resize to 224, ImageNet mean / std), no augmentation.
    config.input = dict(dataset=arg.dataset, data_dir=arg.data_dir or None, train_split="train", eval_split="test",
                        pp_train="decode|resize(224)|normalize()", pp_eval="decode|resize(224)|normalize()")
    config.batch_size = 64
    config.total_epochs = None
    config.total_steps = 20000

    config.optim.name = "adamw"
    config.optim.lr = 1.5e-4
    config.optim.b1 = 0.9
    config.optim.b2 = 0.95
    config.optim.weight_decay = 0.01
    config.optim.warmup_epochs = None
    config.optim.warmup_steps = 0
    config.optim.schedule = "linear"
    config.optim.min_lr = 0.0
    # timm's add_weight_decay without a skip list, as the official scripts: every >= 2-D param decays, tokens too.
    config.optim.no_decay = ()

    config.log_every_steps = 100
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 5000
    config.keep_checkpoints = 2

    if arg.runlocal:
        config.model = dict(config_utils.MAE_RUNLOCAL_ENCODER)
        config.objective_kwargs.update(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
        config.input = config_utils.digits_input(padding=1)
        config_utils.runlocal_schedule(config)
        config.optim.lr = 1.5e-3
    return config
