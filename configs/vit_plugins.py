r"""ViT-S/16 on ImageNet-1k with one of the small plug-ins (`vitjax.models.plugins`): GGeM, polyphase, GMM.

    python -m vitjax.main --config=configs/vit_plugins.py:plugin=ggem --workdir=/ckpt/vit_s16_ggem
    python -m vitjax.main --config=configs/vit_plugins.py:plugin=poly --workdir=/ckpt/vit_s16_poly
    python -m vitjax.main --config=configs/vit_plugins.py:plugin=gmm --workdir=/ckpt/vit_s16_gmm
    python -m vitjax.main --config=configs/vit_plugins.py:plugin=poly,runlocal --workdir=/tmp/poly_local
    python -m vitjax.main --config=configs/vit_plugins.py:plugin=all,runlocal --workdir=/tmp/plugins_local
    python experiments/shift_consistency.py      # the poly ViT's shift consistency on the digits

Every recipe is configs/vit_i1k.py's DeiT recipe for S/16 (see its header; 300 epochs, AdamW, batch 1024,
RandAugment, mixup / cutmix, drop-path 0.1, bf16) with the plug-in's model options. None of these runs was made
here (no ImageNet on this machine); the expected figures are the papers'.

plugin=ggem  Ko et al. 2022, "Group Generalized Mean Pooling for Vision Transformer": no class token,
             GGeM over the patch tokens with one group per head (6 for S/16) and exponents starting at
             p_init=3 (`p_init=`; GeM's customary start), then fc_norm and the head. Expected: a few tenths of
             a point above the average-pooled DeiT-S (the paper reports +0.1 to +0.7 points on ImageNet-1k).
plugin=poly  Ding et al., CVPR 2024, "Reviving Shift Equivariance in Vision Transformers": adaptive polyphase
             patch embedding (+ LayerNorm) and PosConv (circular depthwise 3x3) instead of the absolute position
             embedding, dropout 0.1 before the head and 400 epochs, as the official configs/pvit_small_w.yaml
             (their Swin-based trainer's AdamW, lr 5e-4, wd 0.05, 20 warmup epochs are replaced by the DeiT
             recipe here). Expected: top-1 near DeiT-S and 100% consistency (same top-1 class) under circular
             shifts of the input, where a plain ViT is not (the paper's consistency tables).
plugin=gmm   Li et al. 2023, "RetNet viewed through convolution": every block's attention logits multiplied by
             a Gaussian mixture of the tokens' grid offsets (`kernels=`, 5 as the official main.py's
             default), no class token, average pooling, qkv without bias (the official GMM-ViT). The official
             runs are on CIFAR / SVHN / Tiny-ImageNet with their small ViT (width 192, depth 9, 12 heads,
             MLP ratio 2, 100 epochs): GMM-ViT 95.06% vs ViT 93.65% on CIFAR-10 (their README's table).

plugin=all   the three together (no class token, GGeM pooling, polyphase + PosConv, GMM mask): no paper's
             recipe; the trainer test runs it (tests/test_vit_plugins.py), one run covering every plug-in.

`runlocal` keeps the recipe on the bundled digits (16x16, 4x4 patches, width 32, depth 2) for seconds on a CPU,
as configs/vit_i1k.py:runlocal.
"""
from vitjax import config_utils

PLUGINS = ("ggem", "poly", "gmm", "all")


def get_config(arg=None):
    """Returns the ViT-S/16 plug-in config; arguments: plugin, p_init (ggem), kernels (gmm), data_dir, runlocal."""
    arg = config_utils.parse_arg(arg, plugin="ggem", p_init=3.0, kernels=5, data_dir="", runlocal=False,
                                 choices=dict(plugin=PLUGINS))
    base = "variant=S/16" + (",runlocal" if arg.runlocal else "")
    base += f",data_dir={arg.data_dir}" if arg.data_dir else ""
    config = config_utils.load_config(f"configs/vit_i1k.py:{base}")
    model = dict(config.model)
    chosen = ("ggem", "poly", "gmm") if arg.plugin == "all" else (arg.plugin,)
    if "gmm" in chosen:
        model.update(class_token=False, global_pool="avg", qkv_bias=False, attention_mask="gmm",
                     gmm_kernels=arg.kernels)
    if "ggem" in chosen:
        model.update(class_token=False, global_pool="ggem", ggem_p_init=arg.p_init)
    if "poly" in chosen:
        model.update(patch_embed_type="poly", pos_embed="conv", drop_rate=0.1)
        if arg.plugin == "poly" and not arg.runlocal:
            config.total_epochs = 400.0
    config.model = model
    return config
