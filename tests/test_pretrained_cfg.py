"""Every registered model carries timm's pretrained preprocessing; pp strings are built from it."""
import math

import pytest

from vitjax import data, models
from vitjax.data import ops

# Registered names timm does not know: CvT (timm has no CvT; the registry uses Microsoft's release
# settings), "vit" (any variant, no weights of its own; the ViT family default) and the two-tower CLIP /
# SigLIP models (open_clip's and transformers' names; tests/test_clip.py checks their preprocessing).
NOT_IN_TIMM = ("cvt_13", "cvt_13_384", "cvt_21", "cvt_21_384", "cvt_w24", "cvt_w24_384", "vit",
               "clip_vit_b16", "clip_vit_b32", "clip_vit_l14", "clip_vit_tiny_digits", "siglip_base_patch16_224")
# Families timm lacks: LookupViT (no code released), T2T-ViT and HorNet (their official repositories' names and
# preprocessing: T2T-ViT's default_cfg crop 0.9; HorNet's main.py crop 0.875, uncropped at 384), CrossFormer and RMT
# (their official eval: resize 256, centre crop 224, bicubic, ImageNet mean and std: the default cfg), SpectFormer
# (its datasets.py: crop 0.875 vanilla, 0.96 hierarchical), Hyena N-D (its DeiT main.py: crop 0.875), FcaFormer
# (ConvNeXt's eval, crop 224 / 256: the default cfg), SG-Former (timm's _cfg(): the default cfg), ChannelViT (the
# default cfg, 3 channels) and Activator (32 px CIFAR-10, Normalize(0.5, 0.5), uncropped).
NOT_IN_TIMM += tuple(name for family in ("lookupvit", "t2t_vit", "hornet", "crossformer", "rmt", "spectformer",
                                         "hyena2d", "fcaformer", "sgformer", "channelvit", "activator")
                     for name in models.list_models(family))
# SN-Net v2 (its official configs: eval_crop_ratio 1.0, bicubic, ImageNet mean and std).
NOT_IN_TIMM += tuple(models.list_models("snnetv2_"))


@pytest.mark.parametrize("name", models.list_models())
def test_pretrained_cfg_matches_timm(name):
    timm_models = pytest.importorskip("timm.models")
    reference = timm_models.get_pretrained_cfg(name)
    if name in NOT_IN_TIMM:
        assert reference is None, f"timm now knows {name}: compare it and drop it from NOT_IN_TIMM"
        pytest.skip(f"timm has no pretrained cfg for {name}")
    assert reference is not None, f"timm does not know {name}: add it to NOT_IN_TIMM with the reason"
    expected = dict(input_size=tuple(reference.input_size), mean=tuple(reference.mean), std=tuple(reference.std),
                    crop_pct=reference.crop_pct, interpolation=reference.interpolation)
    assert models.pretrained_cfg(name) == expected


def test_pretrained_cfg_without_timm_and_its_errors():
    assert models.pretrained_cfg("cvt_13") == dict(input_size=(3, 224, 224), mean=(0.485, 0.456, 0.406),
                                                   std=(0.229, 0.224, 0.225), crop_pct=0.875, interpolation="bicubic")
    assert models.pretrained_cfg("cvt_21_384")["input_size"] == (3, 384, 384)
    assert models.pretrained_cfg("cvt_21_384")["crop_pct"] == 1.0
    from vitjax.models.registry import make_pretrained_cfg
    with pytest.raises(ValueError, match=r"Unknown pretrained_cfg key\(s\) \['crop'\]; valid keys: \['crop_pct'"):
        make_pretrained_cfg(dict(crop=0.9))
    with pytest.raises(ValueError, match=r"interpolation 'cubic' is not valid; valid choices: \['bicubic'"):
        make_pretrained_cfg(dict(interpolation="cubic"))


def test_pretrained_pp_strings():
    cfg = models.pretrained_cfg("vit_base_patch16_224")  # 224, crop 0.9, mean = std = 0.5
    eval_pp = data.pretrained_pp(cfg)
    assert eval_pp == ("decode|resize_small(248, method='bicubic', antialias=True)|central_crop(224)|"
                       "normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))")
    assert math.floor(224 / 0.9) == 248  # timm's eval resize: floor(size / crop_pct)
    gray = data.pretrained_pp(models.pretrained_cfg("deit_tiny_patch16_224"), image_size=32, channels=1)
    assert gray.startswith("decode(channels=1)|gray_to_rgb|resize_small(35, method='bicubic', antialias=True)|"
                           "central_crop(32)|normalize(mean=(0.485, 0.456, 0.406)")
    train_pp = data.pretrained_pp(cfg, train=True)
    assert train_pp == ("decode|inception_crop(224, method='bicubic', antialias=True)|flip_lr|"
                        "normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))")
    assert data.pretrained_pp(cfg, image_size=(224, 320)).split("|")[1:3] == [
        "resize((248, 355), method='bicubic', antialias=True)", "central_crop((224, 320))"]
    for pp in (eval_pp, gray, train_pp):
        assert ops.build_preprocess(pp).names[0] == "decode"  # every op and argument is valid
    with pytest.raises(ValueError, match=r"lacks \['crop_pct'\]"):
        data.pretrained_pp({key: value for key, value in cfg.items() if key != "crop_pct"})
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        data.pretrained_pp(cfg, channels=4)
