r"""A tiny CLIP trained on captions of the bundled digits ("a photo of the number seven."), on a CPU.

    python -m vitjax.main --config=configs/clip_digits.py --workdir=/tmp/clip_digits
    python -m vitjax.main --config=configs/clip_digits.py:loss=sigmoid --workdir=/tmp/siglip_digits

Expected (measured by experiments/clip_digits.py, experiments/out/clip_digits.md): after 1,000 steps,
zero-shot top-1 on the 360 test digits 96.11% with the softmax loss and 92.78% with the sigmoid loss
(prompt ensemble of the 8 digits templates; chance 10%), image->text recall@1 the same and
text->image recall@1 100%, in 6.7 and 7.8 minutes on a shared 2-core CPU machine.
`:runlocal` shrinks the run to a seconds-long smoke test (accuracy near chance).

Arguments (`:key=value,...`): loss "softmax" (CLIP) or "sigmoid" (SigLIP: the model gets SigLIP's
logit scale log(10) and bias -10 at init); runlocal.

Model `clip_vit_tiny_digits` (`vitjax.models.clip`): a ViT image tower (16x16 inputs in 4x4 patches here,
width 64, depth 2) and a causal text tower (width 64, depth 2, 16 tokens, CLIP's BPE vocabulary) into a
64-d embedding. Every train image gets a caption from its label: a template drawn per example from
`vitjax.text.templates.DIGITS_TEMPLATES` filled with the class name, tokenized by CLIP's BPE
(`vitjax.text.ops`). The evaluation captions use the first template, "a photo of the number {}.".

Evaluators (`config.evals`):
  zeroshot    zero-shot classification of the test images: class embeddings are the mean of the
              text embeddings of every template (CLIP's prompt ensemble).
  retrieval   image->text and text->image recall@1/5/10 over the 360 test pairs; a retrieved
              caption counts when its tokens equal the query image's caption (here: its class's).
"""
import math

from vitjax import config_utils

LOSSES = ("softmax", "sigmoid")
CONTEXT_LENGTH = 16  # clip_vit_tiny_digits' text context; the longest digits caption has 11 tokens


def pp(train: bool) -> str:
    """Returns the pp string: a 3-channel 16x16 image and the caption's token ids as "text"."""
    image = "decode(channels=1)|resize(16)" + ("|random_crop(16, padding=1)" if train else "")
    caption = "label_caption('digits', 'digits')" if train else "label_caption('digits', 'digits', template=0)"
    return (f"{image}|gray_to_rgb|value_range(-1, 1)|{caption}"
            f"|tokenize('clip', context_length={CONTEXT_LENGTH})")


def get_config(arg=None):
    """Returns the digits CLIP config; arg: "loss=softmax|sigmoid", "runlocal"."""
    arg = config_utils.parse_arg(arg, loss="softmax", runlocal=False)
    if arg.loss not in LOSSES:
        raise ValueError(f"Unknown loss {arg.loss!r}; valid choices: {list(LOSSES)}")
    config = config_utils.default_config()
    config.seed = 0

    config.model_name = "clip_vit_tiny_digits"
    # 4x4 patches (16 tokens): with 2x2 ones the class token's initial features hardly depend on the
    # image, and both towers sit at the collapsed loss log(batch) for hundreds of steps.
    config.model = dict(patch_size=4)
    if arg.loss == "sigmoid":  # SigLIP's initialisation (paper, Sec. 3.4): t' = log 10, b = -10
        config.model.update(init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    config.objective = "clip"
    config.objective_kwargs = dict(loss=arg.loss)

    config.input = dict(
        dataset="digits",
        train_split="train",
        eval_split="test",
        pp_train=pp(train=True),
        pp_eval=pp(train=False),
        pp_modules=("vitjax.text.ops",),
    )
    config.evals = dict(
        zeroshot=dict(kind="zeroshot", classnames="digits", templates="digits"),
        retrieval=dict(kind="retrieval"),
    )

    config.batch_size = 128
    config.eval_batch_size = 120
    config.total_steps = 1000

    config.optim.name = "adamw"
    config.optim.lr = 1e-3
    config.optim.weight_decay = 0.1  # CLIP's 0.2 on 400M pairs; less for 1,437 images
    config.optim.b2 = 0.98  # CLIP (Radford et al. 2021, Sec. 2.5): beta2 0.98 for stability
    config.optim.eps = 1e-6
    config.optim.warmup_steps = 50
    config.optim.schedule = "cosine"

    config.log_every_steps = 50
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 2

    if arg.runlocal:  # also the tests' run: seconds to compile and train
        config_utils.runlocal_schedule(config, batch_size=32, total_steps=10, warmup_steps=2, log_every_steps=5)
    return config
