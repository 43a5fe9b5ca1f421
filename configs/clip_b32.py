r"""CLIP ViT-B/32 (Radford et al. 2021): contrastive image-text pretraining with the paper's recipe.

    python -m vitjax.main --config=configs/clip_b32.py --workdir=/ckpt/clip_b32
    python -m vitjax.main --config=configs/clip_b32.py:epochs=10,data_dir=/data/tfds --workdir=/ckpt/clip_b32
    python -m vitjax.main --config=configs/clip_b32.py:dataset=coco_captions,text_key=captions/text,eval_split=val \
        --workdir=/ckpt/clip_b32_coco
    python -m vitjax.main --config=configs/clip_b32.py:runlocal --workdir=/tmp/clip_b32_local

Expected: not measured (no accelerator here). The paper's ViT-B/32 reaches 63.2% zero-shot top-1 on
ImageNet after 32 epochs of its 400M image-text pairs (WIT), which is not in TFDS. Two data options:
- `text_key=PATH`: a TFDS dataset with a caption feature, e.g. coco_captions (captions under
  `captions/text`, five per image: each example draws one per step, from a seed of the run seed and
  the element index, so a resume sees the same ones); evaluated by image<->text retrieval recall@1/5/10
  on `eval_split`. COCO's 118k images are far fewer than WIT's 400M: it will not match the paper.
- without text_key (the default): a TFDS classification dataset (imagenet2012) captioned through
  CLIP's 80 ImageNet templates (`vitjax.text.templates`): a stand-in, whose "zero-shot" evaluation
  on the same classes is not zero-shot and will not match the paper.
A missing dataset stops the run at its start with how to prepare it (as the other ImageNet configs).

Recipe (Sec. 2.5 and Appendix F, Table 19/20 for ViT-B/32): batch 32,768, AdamW (beta1 0.9, beta2 0.98,
eps 1e-6), lr 5e-4 with 2,000 warmup steps then cosine to 0, weight decay 0.2 (not on gains, biases,
embeddings, temperature), learnable temperature from 0.07 with exp(logit_scale) clipped at 100,
mixed precision, 224 px random square crops, no other augmentation, 32 epochs. Text: CLIP's BPE, 77
tokens. The softmax loss gathers the features over the data / fsdp axes (`vitjax.objectives.clip`).

Arguments: epochs (32), data_dir (TFDS data dir; default $TFDS_DATA_DIR), dataset (imagenet2012),
text_key (the caption feature's path; empty: class-label templates), eval_split (validation),
runlocal (the tiny digits CLIP, seconds on a CPU).
"""
from vitjax import config_utils

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's pixel statistics, as the converted weights expect
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pp(image_size: int, train: bool, classnames: str | None, templates: str | None, tokenize: str,
            mean=CLIP_MEAN, std=CLIP_STD) -> str:
    """Returns the pp string: a random (train) or centre (eval) square crop, normalised, and a tokenized caption.

    The caption is the dataset's "text" field (classnames None) or a class label through templates.
    """
    if train:
        image = (f"decode_jpeg_and_inception_crop({image_size}, scale=(0.9, 1.0), ratio=(1.0, 1.0), "
                 "method='bicubic', antialias=True)")
    else:
        image = f"decode|resize_small({image_size}, method='bicubic', antialias=True)|central_crop({image_size})"
    template = "" if train else ", template=0"
    caption = "" if classnames is None else f"|label_caption('{classnames}', '{templates}'{template})"
    return f"{image}|normalize(mean={mean}, std={std}){caption}|{tokenize}"


def input_config(arg, tokenize: str, mean=CLIP_MEAN, std=CLIP_STD) -> dict:
    """Returns config.input: the dataset's caption feature (arg.text_key), else ImageNet templates on its labels."""
    names = (None, None) if arg.text_key else ("imagenet", "imagenet")
    config = dict(
        dataset=arg.dataset, data_dir=arg.data_dir or None, train_split="train", eval_split=arg.eval_split,
        pp_train=clip_pp(224, True, *names, tokenize, mean=mean, std=std),
        pp_eval=clip_pp(224, False, *names, tokenize, mean=mean, std=std),
        pp_modules=("vitjax.text.ops",))
    if arg.text_key:
        config.update(label_key=None, text_key=arg.text_key)
    return config


def get_config(arg=None):
    """Returns the CLIP ViT-B/32 config; arguments: epochs, data_dir, dataset, text_key, eval_split, runlocal."""
    arg = config_utils.parse_arg(arg, epochs=32, data_dir="", dataset="imagenet2012", text_key="",
                                 eval_split="validation", runlocal=False)
    config = config_utils.default_config()
    config.seed = 0
    config.model_name = "clip_vit_b32"
    config.model = dict(dtype="bfloat16")
    config.objective = "clip"
    config.objective_kwargs = dict(loss="softmax", max_scale=100.0)

    tokenize = "tokenize('clip', context_length=77)"
    config.input = input_config(arg, tokenize)
    if arg.text_key:
        config.evals = dict(retrieval=dict(kind="retrieval"))
    else:
        config.evals = dict(zeroshot=dict(kind="zeroshot", classnames="imagenet", templates="imagenet"))

    config.batch_size = 32768
    config.eval_batch_size = 1000
    config.total_epochs = float(arg.epochs)
    config.optim.name = "adamw"
    config.optim.lr = 5e-4
    config.optim.b1, config.optim.b2, config.optim.eps = 0.9, 0.98, 1e-6
    config.optim.weight_decay = 0.2
    config.optim.warmup_steps = 2000
    config.optim.schedule = "cosine"
    config.optim.min_lr = 0.0

    config.log_every_steps = 50
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 2

    if arg.runlocal:
        local_run(config, "softmax")
    return config


def local_run(config, loss: str) -> None:
    """Shrinks `config` in place to the recipe on the tiny digits CLIP (configs/clip_digits.py), 10 steps."""
    local = config_utils.load_config(f"configs/clip_digits.py:loss={loss},runlocal")
    config.model_name, config.model = local.model_name, local.model
    config.input, config.evals = local.input, local.evals
    config_utils.runlocal_schedule(config, batch_size=32, total_steps=10, warmup_steps=2, log_every_steps=5)
