r"""ViT-S/16 on ImageNet-1k with outlier-free attention (Bondarenko, Nagel, Blankevoort, NeurIPS 2023).

    python -m vitjax.main --config=configs/outlier_free_vit.py:method=clipped --workdir=/ckpt/vit_s16_clipped
    python -m vitjax.main --config=configs/outlier_free_vit.py:method=gated --workdir=/ckpt/vit_s16_gated
    python -m vitjax.main --config=configs/outlier_free_vit.py:method=vanilla --workdir=/ckpt/vit_s16_vanilla
    python -m vitjax.main --config=configs/outlier_free_vit.py:method=clipped,runlocal --workdir=/tmp/ofree_local
    python -m vitjax.quant --init_from=/ckpt/vit_s16_clipped --method=minmax --w_bits=8 --a_bits=8

Expected (the paper's ViT-S/16 experiment, Table 2, not reproduced here): FP32 top-1 on par with the vanilla
model; a much smaller max infinity norm and average kurtosis of the block outputs than vanilla; and W8A8
(per-tensor activations) within about a point of FP32 for clipped / gated where vanilla loses several
points. The `outliers` evaluator reports the two metrics at the end of training (config.evals).

method: vanilla | clipped | gated. clipped: softmax_kind="clipped" with gamma = -alpha / T (T the 197 tokens)
and zeta = 1, alpha=12 by default (`alpha=`), the paper's ViT setting as we read its Table 2 / appendix;
gated: a per-head linear gate sigmoid(G_h(x_h)) on every head's output, gate bias logit(0.25) (`gate_init=`),
the paper's conditional per-token linear gate. Recipe otherwise configs/vit_i1k.py's DeiT recipe for S/16
(300 epochs, AdamW, batch 1024, RandAugment, mixup / cutmix, drop-path 0.1), bf16 compute; see its header.
`runlocal` shrinks it to the digits ViT of vit_i1k.py:runlocal (17 tokens), where alpha=12 would clip every
weight below 0.7 to 0: there gamma is -0.025 (the official BERT script's "clipped(-.025:1)").
"""
from vitjax import config_utils

METHODS = ("vanilla", "clipped", "gated")


def get_config(arg=None):
    """Returns the outlier-free ViT config; arguments: method, alpha, gate_init, data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, method="clipped", alpha=12.0, gate_init=0.25, data_dir="", runlocal=False,
                                 choices=dict(method=METHODS))
    base = "variant=S/16" + (",runlocal" if arg.runlocal else "")
    base += f",data_dir={arg.data_dir}" if arg.data_dir else ""
    config = config_utils.load_config(f"configs/vit_i1k.py:{base}")
    model = dict(config.model)
    if arg.method == "clipped":
        if arg.runlocal:
            model.update(softmax_kind="clipped", clip_gamma=-0.025, clip_zeta=1.0)
        else:
            model.update(softmax_kind="clipped", clip_alpha=arg.alpha, clip_zeta=1.0)
    elif arg.method == "gated":
        model.update(attn_gate="linear", attn_gate_init=arg.gate_init)
    config.model = model
    config.evals = dict(
        eval=dict(kind="classification"),
        # Outliers on the first batches of the eval split at the end of training (every_steps=0).
        outliers=dict(kind="outliers", max_batches=2 if arg.runlocal else 10, every_steps=0),
    )
    return config
