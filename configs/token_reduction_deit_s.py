r"""DeiT-S fine-tuned (or evaluated) with a token-reduction method: the papers' DeiT-S recipes, one per method.

    python -m vitjax.main --config=configs/token_reduction_deit_s.py:method=evit \
        --config.init_from=deit_small_patch16_224-cd65a155.pth --config.input.data_dir=/data/tfds --workdir=/ckpt/evit_s
    python -m vitjax.main --config=configs/token_reduction_deit_s.py:method=mctf,runlocal --workdir=/tmp/mctf_local

Expected (the papers' ImageNet figures, quoted in experiments/out/bench_tokens.md; not reproduced here):
  evit  keep 0.7 at blocks 3, 6, 9, fused: 79.5% top-1 at 3.0 GFLOPs (official README; DeiT-S 79.8% at 4.6).
  mctf  r=16 on blocks 1-11: 80.1% at 2.60 GFLOPs (official README).
  ats   the official DeiT_S.yaml evaluates the pretrained DeiT-S off the shelf (TRAIN.ENABLE: False):
        `python -m vitjax.evaluate` with this config's model, or this recipe to fine-tune it.
  tome  r=13 off the shelf (no paper figure quoted here).
`:runlocal` runs the same recipe shape on the bundled digits at 32 px with 4 px patches and DeiT-Ti (seconds).

Recipes (`RECIPES`, on top of configs/finetune.py's transfer recipe, the official scripts' values):
  evit  finetune.sh: 30 epochs from DeiT-S, lr 2e-5 per 512 images (DeiT's scaling) at batch 2048, so blr 1e-5,
        min lr 2e-6, weight decay 1e-6, no warm-up, keep rate fixed (shrink_start_epoch 0, shrink_epochs 0).
        The objective `token_reduction` runs the official keep-rate warm-up (`adjust_keep_rate`) in steps:
        `:method=evit,shrink_start_epoch=10,shrink_epochs=100` gives run_code.sh's (from-scratch) schedule.
  mctf  main.py's DeiT defaults for 30 epochs: lr 5e-4 per 512 images (blr 2.5e-4), min lr 1e-5, 5 warm-up
        epochs, weight decay 0.05; training fuses r_student, evaluation r_eval. Its consistency loss runs with
        `consistency_threshold` > 0 (task_type[2]; main.py's default 0 leaves it off, and the repository publishes
        no training script), e.g. `:method=mctf,consistency_threshold=0.5`, weight `consistency_weight` (1.0).
  ats, tome  the mctf schedule (their repositories give no DeiT-S fine-tuning script).
All: label smoothing 0.1, drop path 0.1, mixup 0.8 / cutmix 1.0 (DeiT), no layer decay.
"""
import math
import os

from vitjax import config_utils

# Each method's DeiT-S token-reduction settings (official argument names) and fine-tuning schedule.
RECIPES = {
    "evit": dict(token_reduction=dict(method="evit", base_keep_rate=0.7, drop_loc=(3, 6, 9), fuse_token=True),
                 blr=1e-5, min_lr=2e-6, weight_decay=1e-6, warmup_fraction=0.0),
    "mctf": dict(token_reduction=dict(method="mctf", r_eval=16, activate_layer=tuple(range(1, 12))),
                 blr=2.5e-4, min_lr=1e-5, weight_decay=0.05, warmup_fraction=5 / 30),
    "ats": dict(token_reduction=dict(method="ats"), blr=2.5e-4, min_lr=1e-5, weight_decay=0.05,
                warmup_fraction=5 / 30),
    "tome": dict(token_reduction=dict(method="tome", r=13), blr=2.5e-4, min_lr=1e-5, weight_decay=0.05,
                 warmup_fraction=5 / 30),
}


def get_config(arg=None):
    """Returns the DeiT-S token-reduction recipe of `method` (see the module doc)."""
    arg = config_utils.parse_arg(arg, choices=dict(method=tuple(RECIPES)), method="evit", runlocal=False,
                                 shrink_start_epoch=0, shrink_epochs=0, consistency_threshold=0.0,
                                 consistency_weight=1.0)
    recipe = RECIPES[arg.method]
    finetune = os.path.join(os.path.dirname(os.path.abspath(__file__)), "finetune.py")
    settings = (f"model=deit_small_patch16_224,dataset=imagenet2012,epochs=30,batch_size=2048,"
                f"blr={recipe['blr']},layer_decay=1.0,warmup_fraction={recipe['warmup_fraction']},"
                f"label_smoothing=0.1,drop_path=0.1,mixup=0.8")
    config = config_utils.load_config(finetune + ":" + settings + (",runlocal" if arg.runlocal else ""))
    config.optim.weight_decay = recipe["weight_decay"]
    config.optim.min_lr = recipe["min_lr"]
    config.model.token_reduction = dict(recipe["token_reduction"])
    if arg.method in ("evit", "mctf"):
        config.objective = "token_reduction"
    if arg.method == "evit":
        # The official flags count epochs; the objective counts steps (ImageNet's 1281167 images, or digits').
        steps_per_epoch = math.ceil((1437 if arg.runlocal else 1281167) / config.batch_size)
        config.objective_kwargs = dict(shrink_start_step=int(arg.shrink_start_epoch) * steps_per_epoch,
                                       shrink_steps=int(arg.shrink_epochs) * steps_per_epoch)
    elif arg.method == "mctf":
        config.objective_kwargs = dict(consistency_threshold=float(arg.consistency_threshold),
                                       consistency_weight=float(arg.consistency_weight))
    if arg.runlocal:
        # Digits at 32 px: 4 px patches give 64 tokens to reduce; DeiT-Ti keeps the CPU run short.
        config.model_name = "deit_tiny_patch16_224"
        config.model.patch_size = 4
        if arg.method == "mctf":
            config.model.token_reduction["r_eval"] = 4
    return config
