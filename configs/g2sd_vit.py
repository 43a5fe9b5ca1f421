r"""G2SD: generic-to-specific distillation of a pretrained MAE ViT-B/16 into a ViT-S/16 (Huang et al., CVPR 2023;
the official GD.sh and SD.sh of github.com/pengzhiliang/G2SD, whose settings this config follows).

    # stage 1, generic: an MAE ViT-S/16 (decoder 256 x 4) learns the MAE ViT-B/16's decoder features
    python -m vitjax.main --config=configs/g2sd_vit.py:teacher_init=/ckpt/mae_visualize_vit_base.pth \
        --workdir=/ckpt/g2sd_generic
    # stage 2, specific: the student (with a distillation token) fine-tuned on ImageNet with DeiT's hard
    # distillation from the fine-tuned MAE ViT-B/16
    python -m vitjax.main --config=configs/g2sd_vit.py:stage=specific,init_from=/ckpt/g2sd_generic,\
teacher_init=/ckpt/mae_finetuned_vit_base.pth --workdir=/ckpt/g2sd_specific

    # on a CPU, with the digits: first configs/mae_b16.py:runlocal in /tmp/mae_local (the teacher), then
    python -m vitjax.main --config=configs/g2sd_vit.py:runlocal --workdir=/tmp/g2sd_local

Expected (paper, Table 1): ViT-S/16 82.5% top-1 on ImageNet val after both stages (MAE ViT-S from scratch
79.0%, DeiT-S 79.8%). Not run here (no accelerator); the losses equal the official code's
(tests/test_g2sd.py).

Stage 1 (GD.sh): teacher MAE ViT-B/16 with its 512 x 8 decoder (an official MAE checkpoint with the decoder,
e.g. mae_visualize_vit_base.pth, or a vitjax `mae` workdir), its hidden state after decoder block 4; student MAE
ViT-S/16 with a 256 x 4 decoder (8 heads); mask ratio 0.75 shared by both; smooth-L1 (beta 2) on every token;
300 epochs, batch 4096 (256 x 8 GPUs x 2 accumulation), AdamW (0.9, 0.95), blr 1.5e-4, weight decay 0.05, 10
warmup epochs, cosine; MAE's augmentation (random-resized crop, scale 0.2-1, flip).
Stage 2 (SD.sh): ViT-S/16 with a distillation token from stage 1's encoder (its position embeddings stay the
fixed sin-cos table, where the official code fine-tunes a learned copy of it), teacher the fine-tuned MAE ViT-B/16,
loss (CE + hard distillation CE) / 2; 200 epochs, batch 1024, blr 1e-3, layer decay 0.75, weight decay 0.05,
no drop path; MAE fine-tuning's augmentation (RandAugment m9 mstd 0.5, mixup 0.8, cutmix 1.0, random erasing
0.25, label smoothing 0.1).

Arguments: stage=generic | specific; teacher_init=PATH; init_from=PATH (stage 2: stage 1's workdir);
data_dir=PATH; runlocal.
"""
from vitjax import config_utils

STAGES = ("generic", "specific")


def get_config(arg=None):
    """Returns the stage's config; see the module docstring for the arguments."""
    arg = config_utils.parse_arg(arg, stage="generic", teacher_init="", init_from="", data_dir="", runlocal=False,
                                 choices=dict(stage=STAGES))
    config = config_utils.default_config()
    config.seed = 0
    data_dir = arg.data_dir or None
    config.model_name = "vit"
    config.optim.name = "adamw"
    config.optim.weight_decay = 0.05
    config.optim.schedule = "cosine"
    config.log_every_steps = 100
    config.keep_checkpoints = 2

    if arg.stage == "generic":
        config.model = dict(variant="S/16", img_size=224, dtype="bfloat16")
        config.objective = "g2sd"
        config.objective_kwargs = dict(
            mask_ratio=0.75, decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8,
            teacher_init=arg.teacher_init or None, teacher_model_name="vit", teacher_model=dict(variant="B/16"),
            teacher_decoder_embed_dim=512, teacher_decoder_depth=8, teacher_decoder_num_heads=16, layer_index=4,
            supervise_all=True, beta=2.0, encoder_weight=0.0)
        config.input = config_utils.imagenet_input(data_dir, crop_scale=(0.2, 1.0))
        config.batch_size = 4096
        config.total_epochs = 300.0
        config.optim.blr = 1.5e-4
        config.optim.b1, config.optim.b2 = 0.9, 0.95
        config.optim.warmup_epochs = 10.0
        config.optim.min_lr = 0.0
        config.eval_every_steps = 0
        config.checkpoint_every_steps = 3125  # ~10 epochs
    else:
        # The encoder's fixed sin-cos position table (stage 1 has no learned one; the official code fine-tunes a
        # learned copy of it, a difference kept here); the distillation token starts fresh.
        config.model = dict(variant="S/16", img_size=224, num_classes=1000, distilled=True, drop_path_rate=0.0,
                            pos_embed="sincos2d", dtype="bfloat16")
        config.init_from_skip = ("^dist_token$",)
        config.objective = "distill"
        config.objective_kwargs = dict(teacher="vit_base_patch16_224", teacher_model=dict(num_classes=1000),
                                       teacher_init=arg.teacher_init or None, distillation_type="hard", alpha=0.5)
        config.init_from = arg.init_from or None
        config.input = config_utils.imagenet_input(
            data_dir, randaug="randaug(2, 9, magnitude_std=0.5, increasing=True)",
            label_smoothing=0.1, mixup=0.8, cutmix=1.0, random_erasing=0.25)
        config.batch_size = 1024
        config.total_epochs = 200.0
        config.optim.blr = 1e-3 / 4  # lr = blr * 1024 / 256 = 1e-3
        config.optim.b1, config.optim.b2 = 0.9, 0.999
        config.optim.layer_decay = 0.75
        config.optim.warmup_epochs = 5.0
        config.optim.min_lr = 1e-6
        config.eval_every_steps = 2500
        config.checkpoint_every_steps = 2500

    if arg.runlocal:
        teacher = dict(config_utils.MAE_RUNLOCAL_ENCODER)   # configs/mae_b16.py:runlocal's encoder
        student = dict(teacher, embed_dim=32, num_heads=2, mlp_dim=64)
        config.input = config_utils.digits_input(padding=1, label_smoothing=0.1 if arg.stage == "specific" else None)
        config_utils.runlocal_schedule(config)
        if arg.stage == "generic":
            config.model = student
            config.objective_kwargs.update(
                decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, teacher_init=arg.teacher_init or
                "/tmp/mae_local", teacher_model=teacher, teacher_decoder_embed_dim=32, teacher_decoder_depth=1,
                teacher_decoder_num_heads=4, layer_index=1)
            config.optim.blr = 1.5e-3
        else:  # the teacher: configs/mae_finetune_b16.py:runlocal's classifier, trained in /tmp/mae_finetune_local
            config.model = dict(student, num_classes=10, distilled=True, pos_embed="sincos2d")
            config.objective_kwargs.update(
                teacher="vit", teacher_init=arg.teacher_init or "/tmp/mae_finetune_local",
                teacher_model=dict(teacher, num_classes=10, global_pool="avg", fc_norm=True))
            config.optim.blr = 2e-3
    return config
