r"""SigLIP B/16 at 224 px (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"): the sigmoid loss's recipe.

    python -m vitjax.main --config=configs/siglip_b16.py:spm=/data/spiece.model --workdir=/ckpt/siglip_b16
    python -m vitjax.main --config=configs/siglip_b16.py:spm=/data/spiece.model,dataset=coco_captions,\
text_key=captions/text,eval_split=val --workdir=/ckpt/siglip_b16_coco
    python -m vitjax.main --config=configs/siglip_b16.py:runlocal --workdir=/tmp/siglip_b16_local

Expected: not measured (no accelerator here). The paper's SigLIP B/16 reaches 76.2% zero-shot top-1
on ImageNet after 40B examples seen of WebLI (its Table 3 / big_vision's model card); with 9B, 73.4%.
WebLI is not public. With `text_key=PATH` the config trains on a TFDS dataset's caption feature
(e.g. coco_captions, `captions/text`: one of an image's captions drawn per example and step) and
evaluates image<->text retrieval on `eval_split`; without it, on a TFDS classification dataset
(default imagenet2012) captioned through CLIP's 80 ImageNet templates, whose zero-shot evaluation
sees its training classes. Neither will match the paper. A missing dataset stops the run at its
start with how to prepare it.

Recipe (Sec. 4 and big_vision's siglip configs): batch 32,768, the sigmoid loss in its chunked ring
form over the data / fsdp axes (`vitjax.objectives.clip`), logit scale exp(t') from t' = log 10 and
bias b = -10, AdamW (beta1 0.9, beta2 0.95) with lr 1e-3, weight decay 1e-4, warmup 5% of the run then
cosine; images in [-1, 1] (224 px, no augmentation beyond the crop); text: a SentencePiece model
(32,000 pieces, 64 tokens, the text tower pools the last position), given by `spm=PATH` (not
downloaded: the user supplies the model file, e.g. big_vision's c4_en).

Arguments: spm (SentencePiece model file; needed unless runlocal), epochs (10), data_dir, dataset
(imagenet2012), text_key (caption feature path; empty: templates), eval_split (validation), runlocal (the tiny digits CLIP with the sigmoid loss and CLIP's BPE, seconds on a CPU).
"""
import math
import os
import sys

from vitjax import config_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clip_b32  # noqa: E402  pylint: disable=wrong-import-position  (shares the pp and the local run)


def get_config(arg=None):
    """Returns the SigLIP B/16 config; arguments: spm, epochs, data_dir, dataset, text_key, eval_split, runlocal."""
    arg = config_utils.parse_arg(arg, spm="", epochs=10, data_dir="", dataset="imagenet2012", text_key="",
                                 eval_split="validation", runlocal=False)
    config = config_utils.default_config()
    config.seed = 0
    config.model_name = "siglip_base_patch16_224"
    config.model = dict(dtype="bfloat16", init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    config.objective = "clip"
    config.objective_kwargs = dict(loss="sigmoid")

    if arg.runlocal:
        clip_b32.local_run(config, "sigmoid")
        config.optim.update(name="adamw", lr=1e-3, b1=0.9, b2=0.95, weight_decay=1e-4)
        return config
    # get_config stays pure (it never touches the disk): without spm=PATH the run stops when its pp is
    # parsed, before anything compiles, with vitjax.text's "No SentencePiece model at ''" error.
    tokenize = f"tokenize('sentencepiece', model_file='{arg.spm}', context_length=64)"
    half = (0.5, 0.5, 0.5)  # [-1, 1] inputs
    config.input = clip_b32.input_config(arg, tokenize, mean=half, std=half)
    if arg.text_key:
        config.evals = dict(retrieval=dict(kind="retrieval"))
    else:
        config.evals = dict(zeroshot=dict(kind="zeroshot", classnames="imagenet", templates="imagenet",
                                          tokenizer="sentencepiece",
                                          tokenizer_kwargs=dict(model_file=arg.spm, context_length=64)))

    config.batch_size = 32768
    config.eval_batch_size = 1000
    config.total_epochs = float(arg.epochs)
    config.optim.name = "adamw"
    config.optim.lr = 1e-3
    config.optim.b1, config.optim.b2 = 0.9, 0.95
    config.optim.weight_decay = 1e-4
    config.optim.warmup_epochs = 0.05 * arg.epochs
    config.optim.schedule = "cosine"
    config.optim.min_lr = 0.0

    config.log_every_steps = 50
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 2
    return config
