r"""PVP (pre-trained visual prompts, vitjax/adapt/pvp.py) on the bundled digits: two runs, one per stage.

    # stage 1: VPT-deep prompts (and a head) on the source task, the quickstart encoder frozen
    python -m vitjax.main --config=configs/pvp_digits.py:stage=source --config.init_from=/tmp/vitjax_digits \
        --workdir=/tmp/pvp_source
    # stage 2: the target task (the digits' 10 classes, 1,000 training images), prompts from stage 1
    python -m vitjax.main --config=configs/pvp_digits.py:stage=target --config.init_from=/tmp/pvp_source \
        --workdir=/tmp/pvp_target

Expected: stage 2's log lists `vpt/prompts` and `vpt/deep_prompts` as "loaded" and the head as skipped;
top-1 as the pvp row of the README's transfer table (experiments/out/transfer_pvp_digits_supervised.md,
200 steps: 98.06% on the 360 test images; `experiments/transfer.py --methods=pvp` runs both stages).

The paper (Song et al. 2023) pre-trains the prompts of VPT-deep on a large labelled set (ImageNet) with a frozen
ViT and tunes them on few-shot FGVC / VTAB-1k; neither is offline here, so the source task is the
digits' training images after the first 1,000 (`train[1000:]`, 437 images) with a coarser label set
(class // 2: 5 classes, `relabel`), and the target the first 1,000 with the 10 digit classes. Settings as
experiments/transfer.py's vpt_deep: 5 prompts per layer, blr 1e-2, no weight decay, 200 steps of 128.

Arguments: stage ("source" | "target"), runlocal (a 10-step smoke run of the tiny quickstart model).
"""
from vitjax import config_utils
from vitjax.adapt import pvp as pvp_lib

STAGES = ("source", "target")


def get_config(arg=None):
    """Returns the config of one PVP stage; arg: "stage=source|target[,runlocal]"."""
    arg = config_utils.parse_arg(arg, choices=dict(stage=STAGES), stage="target", runlocal=False)
    config = config_utils.load_config("configs/digits_vit.py:runlocal" if arg.runlocal else "configs/digits_vit.py")
    config.adapt.method = "vpt"
    config.adapt.num_tokens = 5
    config.adapt.deep = True
    config.init_from_skip = (r"^head/",)  # stage 1: the encoder's head; stage 2: the source task's head
    config.optim.blr = 1e-2
    config.optim.weight_decay = 0.0
    if not arg.runlocal:
        config.total_steps = 200
        config.optim.warmup_steps = 20
        config.eval_every_steps = 0
        config.checkpoint_every_steps = 0
    pp_train = "decode(channels=1)|resize(16)|random_crop(16, padding=1)|value_range(-1, 1)"
    pp_eval = "decode(channels=1)|resize(16)|value_range(-1, 1)"
    if arg.stage == "source":
        relabel = f"|relabel({pvp_lib.DIGITS_SOURCE_MAPPING})"
        config.input.pp_modules = ("vitjax.adapt.pvp",)
        config.input.train_split = "train[1000:]"
        config.input.pp_train, config.input.pp_eval = pp_train + relabel, pp_eval + relabel
    else:
        config.input.train_split = "train[:1000]"
    return config
