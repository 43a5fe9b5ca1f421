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
        min lr 2e-6, weight decay 1e-6, no warm-up, keep rate fixed (shrink_epochs 0). The from-scratch
        recipe's keep-rate warm-up is `vitjax.tokens.evit.adjust_keep_rate`; the trainer here keeps one model
        per run, so a warm-up needs a run per keep-rate phase (not wired in).
  mctf  main.py's DeiT defaults for 30 epochs: lr 5e-4 per 512 images (blr 2.5e-4), min lr 1e-5, 5 warm-up
        epochs, weight decay 0.05. Its consistency loss (`vitjax.tokens.mctf.consistency_loss`) needs a second,
        teacher forward that the supervised objective does not run: not wired in.
  ats, tome  the mctf schedule (their repositories give no DeiT-S fine-tuning script).
All: label smoothing 0.1, drop path 0.1, mixup 0.8 / cutmix 1.0 (DeiT), no layer decay.
"""
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
    arg = config_utils.parse_arg(arg, choices=dict(method=tuple(RECIPES)), method="evit", runlocal=False)
    recipe = RECIPES[arg.method]
    finetune = os.path.join(os.path.dirname(os.path.abspath(__file__)), "finetune.py")
    settings = (f"model=deit_small_patch16_224,dataset=imagenet2012,epochs=30,batch_size=2048,"
                f"blr={recipe['blr']},layer_decay=1.0,warmup_fraction={recipe['warmup_fraction']},"
                f"label_smoothing=0.1,drop_path=0.1,mixup=0.8")
    config = config_utils.load_config(finetune + ":" + settings + (",runlocal" if arg.runlocal else ""))
    config.optim.weight_decay = recipe["weight_decay"]
    config.optim.min_lr = recipe["min_lr"]
    config.model.token_reduction = dict(recipe["token_reduction"])
    if arg.runlocal:
        # Digits at 32 px: 4 px patches give 64 tokens to reduce; DeiT-Ti keeps the CPU run short.
        config.model_name = "deit_tiny_patch16_224"
        config.model.patch_size = 4
        if arg.method == "mctf":
            config.model.token_reduction["r_eval"] = 4
    return config
