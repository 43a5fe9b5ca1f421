r"""HST (hierarchical side-tuning, vitjax/adapt/hst.py) on the bundled digits from the quickstart encoder.

    python -m vitjax.main --config=configs/hst_digits.py --config.init_from=/tmp/vitjax_digits --workdir=/tmp/hst

Expected: the log's trainable count 259,058 of 394,290 (65.70%: at the paper's widths the side network is
large next to this 137k-parameter encoder; 0.97% of a ViT-B/16 with a 1,000-class head), top-1 about 98.4%
on the 360 test images (the hst row of experiments/out/transfer_digits_all.md: 98.43 +- 0.13 over 3 seeds).

Paper defaults (Lin et al., the official ViT-B/16 settings of AFeng-x/HST `models/vit_hsn.py` and its VTAB-1k
scripts `train_scripts/vit/vtab/*/train_s4.sh`): side stages 32 / 48 / 64 / 72 wide with 2 / 4 / 8 / 12
heads, 3 layers each, 1 meta token per layer; AdamW at lr 1e-2, weight decay 5e-4, 10 warm-up epochs of 100,
no augmentation, no drop path. Here the encoder's 4 layers give one per stage; the schedule is the transfer
harness's (200 steps of 128, 20 warm-up) with the paper's learning rate and weight decay.

Arguments: runlocal (a 10-step smoke run of the 2-block runlocal model: side_depths (1, 1, 0, 0)).
"""
from vitjax import config_utils


def get_config(arg=None):
    """Returns the HST digits config; arg: "runlocal" for the CPU smoke run."""
    arg = config_utils.parse_arg(arg, runlocal=False)
    config = config_utils.load_config("configs/digits_vit.py:runlocal" if arg.runlocal else "configs/digits_vit.py")
    config.adapt.method = "hst"
    config.adapt.side_dims = (32, 48, 64, 72)
    config.adapt.side_heads = (2, 4, 8, 12)
    config.adapt.meta_tokens = 1
    config.init_from_skip = (r"^head/",)  # the encoder's head: HST's head sees the side network's 72 features
    config.optim.blr = 1e-2
    config.optim.weight_decay = 5e-4
    config.model.drop_path_rate = 0.0
    config.input.train_split = "train[:1000]"
    if arg.runlocal:
        config.adapt.side_depths = (1, 1, 0, 0)
    else:
        config.total_steps = 200
        config.optim.warmup_steps = 20
        config.eval_every_steps = 0
        config.checkpoint_every_steps = 0
    return config
