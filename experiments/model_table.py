"""Every registered model: parameters and GMACs at its native resolution, beside the papers' numbers.

    python experiments/model_table.py                  # all models -> experiments/out/model_table.{md,json}
    python experiments/model_table.py --filter swin    # a subset
    python experiments/model_table.py --update-readme  # also rewrite the table in README.md
    python experiments/model_table.py --filter clip --merge   # re-measure a subset, keep the other rows

A two-tower model (CLIP, SigLIP) is measured on one image and one text of its full context length.

Parameters come from `jax.eval_shape` (no weights are made); compute from XLA's cost analysis of the
lowered forward pass at batch 1. XLA counts a multiply-add as 2 FLOPs; papers (and fvcore, which they use)
count it as 1 and call it "FLOPs", so the table reports XLA FLOPs / 2 as GMACs to compare like with like.
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from experiment_io import write_outputs  # noqa: E402
from vitjax import models  # noqa: E402

# (params in millions, GFLOPs as the paper reports them = GMACs), from each paper's tables.
PUBLISHED = {
    "vit_tiny_patch16_224": (5.7, 1.3), "vit_small_patch16_224": (22.1, 4.6), "vit_base_patch16_224": (86.6, 17.6),
    "vit_base_patch16_384": (86.9, 55.5), "vit_large_patch16_224": (304.3, 61.6),
    "deit_tiny_patch16_224": (5.7, 1.3), "deit_small_patch16_224": (22.1, 4.6), "deit_base_patch16_224": (86.6, 17.6),
    "deit_tiny_distilled_patch16_224": (5.9, 1.3), "deit_small_distilled_patch16_224": (22.4, 4.6),
    "deit_base_distilled_patch16_224": (87.3, 17.6), "deit_base_distilled_patch16_384": (87.6, 55.5),
    "swin_tiny_patch4_window7_224": (28.3, 4.5), "swin_small_patch4_window7_224": (49.6, 8.7),
    "swin_base_patch4_window7_224": (87.8, 15.4), "swin_base_patch4_window12_384": (87.9, 47.0),
    "swin_large_patch4_window7_224": (196.5, 34.5), "swin_large_patch4_window12_384": (196.7, 103.9),
    "convnext_tiny": (28.6, 4.5), "convnext_small": (50.2, 8.7), "convnext_base": (88.6, 15.4),
    "convnext_large": (197.8, 34.4), "convnext_xlarge": (350.2, 60.9),
    "cvt_13": (20.0, 4.5), "cvt_21": (31.6, 7.1), "cvt_13_384": (20.0, 16.3), "cvt_21_384": (31.6, 24.9),
    "cvt_w24_384": (277.3, 193.2),
    "crossvit_tiny_240": (7.0, 1.6), "crossvit_small_240": (26.7, 5.6), "crossvit_base_240": (105.0, 21.2),
    "crossvit_9_240": (8.6, 1.8), "crossvit_15_240": (27.4, 5.8), "crossvit_18_240": (43.3, 9.0),
    "tnt_s_patch16_224": (23.8, 5.2), "tnt_b_patch16_224": (65.6, 14.1),
    "convit_tiny": (6.0, 1.0), "convit_small": (27.0, 5.4), "convit_base": (86.0, 17.0),
    "poolformer_s12": (11.9, 1.8), "poolformer_s24": (21.4, 3.4), "poolformer_s36": (30.9, 5.0),
    "poolformer_m36": (56.2, 8.8), "poolformer_m48": (73.5, 11.6),
    "convformer_s18": (26.8, 3.9), "convformer_s36": (40.0, 7.6), "convformer_m36": (57.1, 12.8),
    "convformer_b36": (99.9, 22.6), "caformer_s18": (26.3, 4.1), "caformer_s36": (39.3, 8.0),
    "caformer_m36": (56.1, 13.2), "caformer_b36": (98.8, 23.2),
    "tiny_vit_5m_224": (5.4, 1.3), "tiny_vit_11m_224": (11.0, 2.0), "tiny_vit_21m_224": (21.0, 4.3),
    "levit_128s": (7.8, 0.305), "levit_128": (9.2, 0.406), "levit_192": (11.0, 0.658),
    "levit_256": (19.0, 1.12), "levit_384": (39.0, 2.353),
    # T2T-ViT: the official yitu-opensource/T2T-ViT README tables (#params, MACs).
    "t2t_vit_7": (4.3, 1.1), "t2t_vit_10": (5.9, 1.5), "t2t_vit_12": (6.9, 1.8), "t2t_vit_14": (21.5, 4.8),
    "t2t_vit_19": (39.2, 8.5), "t2t_vit_24": (64.1, 13.8), "t2t_vit_t_14": (21.5, 6.1), "t2t_vit_t_19": (39.2, 9.8),
    "t2t_vit_t_24": (64.1, 15.0),
    # HorNet: the official raoyongming/HorNet README (ImageNet-1k models; its L rows are ImageNet-22k models).
    "hornet_tiny_7x7": (22.0, 4.0), "hornet_tiny_gf": (23.0, 3.9), "hornet_small_7x7": (50.0, 8.8),
    "hornet_small_gf": (50.0, 8.7), "hornet_base_7x7": (87.0, 15.6), "hornet_base_gf": (88.0, 15.5),
    # CrossFormer / CrossFormer++: the official cheerss/CrossFormer README table (params, FLOPs).
    "crossformer_tiny": (27.8, 2.9), "crossformer_small": (30.7, 4.9), "crossformer_base": (52.0, 9.2),
    "crossformer_large": (92.0, 16.1), "crossformer_pp_small": (23.3, 4.9), "crossformer_pp_base": (52.0, 9.5),
    "crossformer_pp_large": (92.0, 16.6), "crossformer_pp_huge": (96.0, 21.8),
    # RMT: Fan et al. 2024, Table 1 (params, FLOPs); rmt_b / rmt_l are the official RMT_M2 / RMT_L6.
    "rmt_t": (14.0, 2.5), "rmt_s": (27.0, 4.5), "rmt_b": (54.0, 9.7), "rmt_l": (95.0, 18.2),
    # SpectFormer: the official README's tables (vanilla_architecture/, hierarchical_architecture/; FLOPs). Its
    # SpectFormer-XS reads 22M, the official code builds 20.0M (ours equals the code: tests/test_spectformer.py).
    "spectformer-ti": (9.0, 1.8), "spectformer-xs": (22.0, 4.0), "spectformer-s": (32.0, 6.6),
    "spectformer-b": (57.0, 11.5), "spectformer_s": (22.2, 3.9), "spectformer_b": (33.1, 6.3),
    "spectformer_l": (54.7, 12.7),
    # Hyena N-D: no entries (its paper reports no ImageNet model sizes); parameter counts equal the official code's
    # (tests/test_hyena_nd.py).
    # FcaFormer: the official fcaformer.py's comments per constructor (L1 and L2 also in its README; MACs).
    "fcaformer_l1": (6.2, 1.37), "fcaformer_l2": (16.3, 3.6), "fcaformer_l3": (27.9, 6.7), "fcaformer_l4": (65.6, 14.5),
    # SG-Former: Ren et al. 2023, the ImageNet-1k table (params, FLOPs) of SG-Former-S / M / B, entered from the
    # paper as read elsewhere (the pages at hand show only its abstract); the params equal the official code's.
    "sgformer_s": (22.5, 4.8), "sgformer_m": (38.7, 7.5), "sgformer_b": (77.9, 15.6),
    # ChannelViT: the official insitro/ChannelViT backbones + a 1000-class classifier (their supervised wrapper) at
    # 224 px on 3 channels, params counted and MACs by torch's FlopCounterMode (the paper gives neither); the hcs_
    # models are the same network trained with channel sampling.
    "channelvit_tiny": (5.6, 4.75), "channelvit_small": (21.9, 15.8), "channelvit_base": (86.2, 56.5),
    "hcs_channelvit_tiny": (5.6, 4.75), "hcs_channelvit_small": (21.9, 15.8), "hcs_channelvit_base": (86.2, 56.5),
    # Activator: the official Abdullah-88/Activator CIFAR-10 models (32 px), params counted on the official code and
    # MACs by torch's FlopCounterMode on it (the paper reports neither).
    "activator": (2.651, 0.169), "activator_only_geglu": (1.599, 0.101),
    # SN-Net v2: Pan et al. 2023; params = the official SNNetv2(lora_r=64) over DeiT-III anchors (both anchors and
    # every stitching layer); GFLOPs of the default stitch (the larger anchor alone: DeiT-III-B / -L, fvcore).
    "snnetv2_deit3_s_b": (117.1, 17.6), "snnetv2_deit3_s_l": (337.6, 61.6), "snnetv2_deit3_b_l": (411.7, 61.6),
    # RegNetY: Radosavovic et al. 2020, Table in the appendix (params, GF).
    "regnety_002": (3.2, 0.2), "regnety_004": (4.3, 0.4), "regnety_006": (6.1, 0.6), "regnety_008": (6.3, 0.8),
    "regnety_016": (11.2, 1.6), "regnety_032": (19.4, 3.2), "regnety_040": (20.6, 4.0), "regnety_064": (30.6, 6.4),
    "regnety_080": (39.2, 8.0), "regnety_120": (51.8, 12.1), "regnety_160": (83.6, 15.9), "regnety_320": (145.0, 32.3),
}


def native_input(model) -> jax.ShapeDtypeStruct:
    """Returns the (1, H, W, C) input of a model at its native resolution."""
    size = getattr(model, "img_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return jax.ShapeDtypeStruct((1, height, width, getattr(model, "in_chans", 3)), jnp.float32)


def native_inputs(model) -> tuple:
    """Returns the model's batch-1 inputs at its native sizes: (images,), or (images, tokens) for two towers."""
    if hasattr(model, "example_inputs"):
        return tuple(model.example_inputs(1))
    return (native_input(model),)


def measure(name: str) -> dict:
    """Returns {params_m, gmacs, seconds} of one registered model at its native resolution."""
    start = time.time()
    model = models.create(name)
    inputs = native_inputs(model)
    images = inputs[0]
    shapes = jax.eval_shape(model.init, {"params": jax.random.key(0)}, *inputs)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))
    cost = jax.jit(lambda v, *x: model.apply(v, *x, train=False)).lower(shapes, *inputs).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(params_m=params / 1e6, gmacs=float(cost["flops"]) / 2e9, resolution=images.shape[1],
                seconds=time.time() - start)


def markdown(rows: dict) -> str:
    """Returns the markdown table of measured and published figures."""
    lines = ["| model | resolution | params (M) | GMACs | paper params (M) | paper GFLOPs |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        paper = PUBLISHED.get(name)
        paper_params, paper_flops = (f"{paper[0]:.1f}", f"{paper[1]:.3g}") if paper else ("", "")
        lines.append(f"| `{name}` | {row['resolution']} | {row['params_m']:.1f} | {row['gmacs']:.3g} | "
                     f"{paper_params} | {paper_flops} |")
    return "\n".join(lines)


README_BEGIN = "<!-- model-table:begin -->"
README_END = "<!-- model-table:end -->"


def update_readme(table: str, path: str) -> None:
    """Replaces the text between the model-table markers of the README with `table`."""
    with open(path) as file:
        text = file.read()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{path} lacks the markers {README_BEGIN} / {README_END}")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    with open(path, "w") as file:
        file.write(f"{head}{README_BEGIN}\n{table}\n{README_END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filter", default="", help="only models whose name contains this")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    parser.add_argument("--update-readme", action="store_true")
    parser.add_argument("--merge", action="store_true", help="keep the rows of the existing JSON not re-measured")
    args = parser.parse_args()
    rows = {}
    if args.merge:
        import json
        with open(os.path.join(args.out, "model_table.json")) as file:
            rows = json.load(file)["rows"]
    for name in models.list_models(args.filter):
        if name == "vit":  # the variant-string builder; its variants are registered under timm names
            continue
        rows[name] = measure(name)
        print(f"{name}: {rows[name]['params_m']:.2f}M, {rows[name]['gmacs']:.3f} GMACs "
              f"({rows[name]['seconds']:.1f}s)", flush=True)
    rows = dict(sorted(rows.items()))
    table = markdown(rows)
    write_outputs(args.out, "model_table", table, {"jax": jax.__version__, "rows": rows, "published": PUBLISHED})
    print(table)
    if args.update_readme:
        update_readme(table, os.path.join(os.path.dirname(__file__), "..", "README.md"))


if __name__ == "__main__":
    main()
