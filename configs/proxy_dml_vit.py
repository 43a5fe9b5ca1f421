r"""Deep metric learning with semantic proxies from visual prompts (Ren et al., ICLR 2024): VPT-deep prompts on a
frozen ViT, an embedding head and Proxy-Anchor against proxies built from class prompts (`vitjax.objectives.proxy_dml`).

    # the paper's CUB-200-2011 recipe: timm's ImageNet-21k ViT-S/16 (e.g. saved with torch.save(timm.create_model(
    # "vit_small_patch16_224.augreg_in21k", pretrained=True).state_dict(), "vit_s16_in21k.pth")) and the TFDS
    # dataset caltech_birds2011 prepared in your TFDS data dir; trained on classes 0-99, retrieval on 100-199
    python -m vitjax.main --config=configs/proxy_dml_vit.py --config.init_from=vit_s16_in21k.pth --workdir=/tmp/cub
    # digits: train on classes 0-4 from the quickstart encoder (python -m vitjax.main --config=configs/digits_vit.py
    # --workdir=/tmp/vitjax_digits), retrieval among the unseen classes 5-9 of the test split
    python -m vitjax.main --config=configs/proxy_dml_vit.py:runlocal --config.init_from=/tmp/vitjax_digits \
        --workdir=/tmp/dml_digits

Expected: CUB, the paper's Table 2 (VPTSP-G, ViT-S/16, embedding 384): Recall@1 86.6 (official README; not
reproduced here, no GPU). Digits (:runlocal, 300 steps of AdamW, 1-2 minutes on 2 CPU cores):
retrieval/recall_at_1 about 0.97 on classes 5-9 (experiments/dml_digits.py: 3 seeds, beside other methods).

The recipe is the official `config/cub200_small.yaml` (github.com/Noahsark/ParameterEfficient-DML, the
configuration of the README's ViT-S/16 figures): 10 deep prompts per layer (VPT-deep), 3 class prompts per layer
and class for the semantic proxies, GRU with ReLU candidate, proxy_bias_ratio 0.5, embedding 384, BitFit (every
backbone bias trains: `adapt.train`'s r"/bias$"), SGD momentum 0.9, lr 0.005 (learnable proxies x20: lr_proxy
0.1), weight decay 1e-6, batch 64, 15 epochs, RandomResizedCrop(224) + flip; test Resize(256) + CenterCrop(224).
Differences: the official sampler draws 2 images each of 32 classes per batch, here batches are random; its
cosine schedule (T_max 50 epochs) stops after 15, here the cosine runs to 0 over the 15 epochs; its weight decay
also reaches norms and biases.
"""
from vitjax import config_utils

CUB_TRAIN_CLASSES = tuple(range(100))       # the DML split of CUB-200-2011: first 100 classes train ...
CUB_TEST_CLASSES = tuple(range(100, 200))   # ... the other 100 are the retrieval test, all their images


def get_config(arg=None):
    """Returns the CUB recipe; arg "runlocal": digits classes 0-4 -> 5-9 from the quickstart encoder."""
    arg = config_utils.parse_arg(arg, runlocal=False, proxies="semantic", adapt=True)
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = "vit_small_patch16_224"
    config.model = dict(num_classes=0)
    config.objective = "proxy_dml"
    config.objective_kwargs = dict(num_classes=len(CUB_TRAIN_CLASSES), embed_dim=384, proxies=arg.proxies,
                                   mode="anchor", pos_alpha=32.0, neg_alpha=32.0, pos_delta=0.1, neg_delta=-0.1,
                                   proxy_bias_ratio=0.5, num_proxy_prompts=3, semantic_mix="gru_relu")
    if arg.adapt:
        config.adapt.method = "vpt"
        config.adapt.num_tokens = 10
        config.adapt.deep = True
        config.adapt.train = (r"^dml/", r"/bias$")   # the objective's head and proxies; BitFit

    config.input = dict(
        dataset="caltech_birds2011",
        train_split="train+test", train_classes=CUB_TRAIN_CLASSES,
        eval_split="train+test", eval_classes=CUB_TEST_CLASSES,
        pp_train="decode|inception_crop(224)|flip_lr|value_range(-1, 1)",
        pp_eval="decode|resize_small(256)|central_crop(224)|value_range(-1, 1)",
    )
    config.evals = dict(retrieval=dict(kind="recall_at_k", ks=(1, 2, 4, 8)))

    config.batch_size = 64
    config.eval_batch_size = 128
    config.total_epochs = 15.0
    config.optim.name = "sgd"
    config.optim.lr = 0.005
    config.optim.momentum = 0.9
    config.optim.weight_decay = 1e-6
    config.optim.schedule = "cosine"
    config.optim.warmup_steps = 0
    config.optim.lr_mult = ((r"^dml/proxies$", 20.0),)   # lr_proxy 0.1 / lr 0.005

    config.log_every_steps = 50
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 2   # a damaged last step falls back to the one before

    if arg.runlocal:
        # The quickstart's model (configs/digits_vit.py): its weights come through config.init_from.
        config.model_name = "vit"
        config.model = dict(variant="mu/4", num_classes=0, img_size=16, in_chans=1, embed_dim=64, depth=4,
                            num_heads=4, mlp_dim=128)
        config.objective_kwargs.update(num_classes=5, embed_dim=64, num_proxy_prompts=2)
        if arg.adapt:
            config.adapt.num_tokens = 5
        config.input = dict(
            dataset="digits", train_split="train", train_classes=(0, 1, 2, 3, 4),
            eval_split="test", eval_classes=(5, 6, 7, 8, 9),
            pp_train="decode(channels=1)|resize(16)|random_crop(16, padding=1)|value_range(-1, 1)",
            pp_eval="decode(channels=1)|resize(16)|value_range(-1, 1)")
        config.batch_size = 64
        config.eval_batch_size = 60
        config.total_epochs = None
        config.total_steps = 300
        # SGD with momentum 0.9 (the paper's optimizer) diverges here once the backbone trains: at lr 0.05 every
        # method but the linear one ends near chance (experiments/out/dml_digits_sgd.md), and full fine-tuning
        # at lr 5e-4 too (gradient norms 100-300 from the alpha-32 loss, the loss back up after 5 steps). AdamW
        # at 1e-3 trains all of them.
        config.optim.name = "adamw"
        config.optim.lr = 1e-3
        config.optim.weight_decay = 0.0
        config.log_every_steps = 50
        config.checkpoint_every_steps = 0
    return config
