"""Image-text contrastive losses, single-device and sharded over the batch axes of a mesh.

Features are L2-normalised (B, E) image and text embeddings, row i of each a matching pair;
`scale` multiplies the cosine similarities (CLIP's exp(logit_scale), SigLIP's t) and `bias` is
SigLIP's b. Two families, each as a full-matrix reference and a sharded form that gives the same
value and gradient:

- softmax (CLIP, Radford et al. 2021): the mean of the image->text and text->image cross-entropies
  over the B x B similarity matrix. Sharded, every device all-gathers the features over the batch
  axes and computes only its own rows against the global batch (open_clip's `local_loss` with
  `gather_with_grad`): B x B/n logits per device; the all-gather's transpose (a reduce-scatter)
  routes the gradient of every row back to the device that owns the example.
- sigmoid (SigLIP, Zhai et al. 2023): -1/B sum_ij log sigmoid(z_ij (scale x_i.y_j + bias)), z = +1
  on the diagonal, -1 off it. Sharded, it is the paper's chunked form (its Figure 1 / Algorithm 1):
  each device keeps its images and passes its text chunk around the ring of batch shards with
  `jax.lax.ppermute`, so a device only ever holds a (B/n) x (B/n) block and never the global B x B
  matrix, and no all-gather of features.

The `*_shard` functions run inside `shard_map` over `axis_names` (the mesh axes the batch is split
over, ("data", "fsdp") in vitjax); `sharded_loss` wraps either in `shard_map` on global arrays.
"""
import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

import vitjax.models as models
from vitjax.objectives.base import Objective, Variables, model_overrides

LOSSES = ("softmax", "sigmoid")
AxisNames = Tuple[str, ...]


def _check(image: jax.Array, text: jax.Array) -> None:
    """Raises ValueError for features that are not two (B, E) arrays of one shape (before any compile)."""
    if image.ndim != 2 or text.ndim != 2:
        raise ValueError(f"Image and text features must be (batch, embed) arrays, got shapes {image.shape} "
                         f"and {text.shape}")
    if image.shape[0] != text.shape[0]:
        raise ValueError(f"The image batch ({image.shape[0]}) and the text batch ({text.shape[0]}) must have the "
                         "same size: row i of each is one image-text pair")
    if image.shape[1] != text.shape[1]:
        raise ValueError(f"Image features have {image.shape[1]} dims, text features {text.shape[1]}: the towers "
                         "must project into one embedding space")


def _sigmoid_block(image, text, scale, bias, positive_diagonal: bool) -> jax.Array:
    """Returns the summed -log sigmoid(z * logits) of one block of pairs (diagonal positive or all negative)."""
    logits = scale * (image @ text.T) + bias
    signs = -jnp.ones_like(logits)
    if positive_diagonal:
        signs = signs + 2.0 * jnp.eye(logits.shape[0], logits.shape[1], dtype=logits.dtype)
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits))


# ---- full-matrix references (one device, or any array layout jit chooses) ------------------------
def softmax_loss(image: jax.Array, text: jax.Array, scale: jax.Array) -> jax.Array:
    """Returns CLIP's symmetric cross-entropy over the full B x B similarity matrix (fp32 scalar)."""
    _check(image, text)
    image, text = image.astype(jnp.float32), text.astype(jnp.float32)
    logits = scale * (image @ text.T)
    labels = jnp.arange(logits.shape[0])
    image_to_text = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], axis=1)
    text_to_image = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], axis=0)
    return (jnp.mean(image_to_text) + jnp.mean(text_to_image)) / 2


def sigmoid_loss(image: jax.Array, text: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """Returns SigLIP's pairwise sigmoid loss over the full B x B matrix, summed over texts, mean over images."""
    _check(image, text)
    image, text = image.astype(jnp.float32), text.astype(jnp.float32)
    return _sigmoid_block(image, text, scale, bias, True) / image.shape[0]


# ---- per-shard forms (inside shard_map over `axis_names`) ----------------------------------------
def softmax_loss_shard(image: jax.Array, text: jax.Array, scale: jax.Array, axis_names: AxisNames) -> jax.Array:
    """Returns the global CLIP loss from this device's rows: features all-gathered, local rows vs the global batch."""
    image, text = image.astype(jnp.float32), text.astype(jnp.float32)
    local = image.shape[0]
    all_image = jax.lax.all_gather(image, axis_names, axis=0, tiled=True)
    all_text = jax.lax.all_gather(text, axis_names, axis=0, tiled=True)
    global_batch = all_image.shape[0]
    # The batch is laid out shard-major over `axis_names`, as axis_index counts them.
    labels = jax.lax.axis_index(axis_names) * local + jnp.arange(local)
    image_to_text = jax.nn.log_softmax(scale * (image @ all_text.T), axis=1)
    text_to_image = jax.nn.log_softmax(scale * (text @ all_image.T), axis=1)
    picked = (jnp.take_along_axis(image_to_text, labels[:, None], axis=1)
              + jnp.take_along_axis(text_to_image, labels[:, None], axis=1))
    return -jax.lax.psum(jnp.sum(picked), axis_names) / (2 * global_batch)


def _ring(num_shards: int):
    """Returns the ppermute pairs that send shard k's chunk to shard k + 1."""
    return [(source, (source + 1) % num_shards) for source in range(num_shards)]


def _block_grads(image, chunk, scale, bias, positive_diagonal: bool, cotangent):
    """Returns (d image, d chunk, d scale, d bias) of cotangent x one block's summed -log sigmoid(z * logits)."""
    similarity = image @ chunk.T
    logits = scale * similarity + bias
    signs = -jnp.ones_like(logits)
    if positive_diagonal:
        signs = signs + 2.0 * jnp.eye(logits.shape[0], logits.shape[1], dtype=logits.dtype)
    # d/dx -log sigmoid(z x) = -z sigmoid(-z x)
    d_logits = -cotangent * signs * jax.nn.sigmoid(-signs * logits)
    return (scale * d_logits @ chunk, scale * d_logits.T @ image, jnp.sum(d_logits * similarity), jnp.sum(d_logits))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sigmoid_ring(image, text, scale, bias, axis_names):
    num_shards = jax.lax.psum(1, axis_names)
    total = _sigmoid_block(image, text, scale, bias, True)

    def hop(carry, _):
        chunk, total = carry
        chunk = jax.lax.ppermute(chunk, axis_names, _ring(num_shards))
        return (chunk, total + _sigmoid_block(image, chunk, scale, bias, False)), None

    if num_shards > 1:
        (_, total), _ = jax.lax.scan(hop, (text, total), None, length=num_shards - 1)
    return jax.lax.psum(total, axis_names) / (image.shape[0] * num_shards)


def _sigmoid_ring_forward(image, text, scale, bias, axis_names):
    # Only the inputs are kept for the backward pass: autodiff through the ring would store every
    # hop's chunk, memory linear in the global batch.
    return _sigmoid_ring(image, text, scale, bias, axis_names), (image, text, scale, bias)


def _sigmoid_ring_backward(axis_names, residuals, cotangent):
    image, text, scale, bias = residuals
    num_shards = jax.lax.psum(1, axis_names)
    cotangent = cotangent / (image.shape[0] * num_shards)
    d_image, d_chunk, d_scale, d_bias = _block_grads(image, text, scale, bias, True, cotangent)
    if num_shards > 1:
        # A chunk's gradient travels with it round the ring, each device adding its images' share;
        # one more hop after the last block brings it home.
        def hop(carry, _):
            chunk, d_chunk, d_image, d_scale, d_bias = carry
            chunk, d_chunk = jax.lax.ppermute((chunk, d_chunk), axis_names, _ring(num_shards))
            grads = _block_grads(image, chunk, scale, bias, False, cotangent)
            return (chunk, d_chunk + grads[1], d_image + grads[0], d_scale + grads[2], d_bias + grads[3]), None

        (_, d_chunk, d_image, d_scale, d_bias), _ = jax.lax.scan(
            hop, (text, d_chunk, d_image, d_scale, d_bias), None, length=num_shards - 1)
        d_chunk = jax.lax.ppermute(d_chunk, axis_names, _ring(num_shards))
    return d_image, d_chunk, jax.lax.psum(d_scale, axis_names), jax.lax.psum(d_bias, axis_names)


_sigmoid_ring.defvjp(_sigmoid_ring_forward, _sigmoid_ring_backward)


def sigmoid_loss_shard(image: jax.Array, text: jax.Array, scale: jax.Array, bias: jax.Array,
                       axis_names: AxisNames) -> jax.Array:
    """Returns the global SigLIP loss by the chunked ring: text chunks passed on with ppermute, no B x B matrix.

    Its gradient is a second ring pass (a custom VJP) that keeps one chunk at a time: per-device
    memory is O(b E + b^2) for a per-device batch b, whatever the number of devices.
    """
    image, text = image.astype(jnp.float32), text.astype(jnp.float32)
    return _sigmoid_ring(image, text, jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32),
                         tuple(axis_names))


# ---- entry point on global arrays ---------------------------------------------------------------
def check_loss_name(name: str) -> str:
    """Returns `name` if it is a known loss; raises ValueError naming the valid ones."""
    if name not in LOSSES:
        raise ValueError(f"Unknown contrastive loss {name!r}; valid choices: {list(LOSSES)}")
    return name


def sharded_loss(name: str, image: jax.Array, text: jax.Array, scale: jax.Array, bias: Optional[jax.Array] = None,
                 *, mesh=None, axis_names: Sequence[str] = ("data", "fsdp")) -> jax.Array:
    """Returns the loss `name` of global (B, E) features, computed shard by shard over `axis_names` of the mesh.

    `mesh` defaults to the one set with `jax.set_mesh` (the trainer sets it); without a mesh, or on
    one whose batch axes have a single shard, it is the full-matrix loss.
    """
    check_loss_name(name)
    _check(image, text)
    if name == "sigmoid" and bias is None:
        raise ValueError("The sigmoid loss needs a bias (SigLIP's b); the model gave none")
    bias = jnp.zeros((), jnp.float32) if bias is None else bias
    scale, bias = jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    axis_names = tuple(axis for axis in axis_names if mesh is not None and not mesh.empty
                       and axis in mesh.axis_names)
    num_shards = 1
    for axis in axis_names:
        num_shards *= mesh.shape[axis]
    if num_shards == 1:
        return softmax_loss(image, text, scale) if name == "softmax" else sigmoid_loss(image, text, scale, bias)
    if image.shape[0] % num_shards:
        raise ValueError(f"The batch {image.shape[0]} is not divisible by the {num_shards} shards of mesh axes "
                         f"{axis_names}")
    if name == "softmax":
        def shard_fn(image, text, scale, bias):
            return softmax_loss_shard(image, text, scale, axis_names)
    else:
        def shard_fn(image, text, scale, bias):
            return sigmoid_loss_shard(image, text, scale, bias, axis_names)
    rows = PartitionSpec(axis_names)
    mapped: Callable = jax.shard_map(shard_fn, mesh=mesh, in_specs=(rows, rows, PartitionSpec(), PartitionSpec()),
                                     out_specs=PartitionSpec())
    return mapped(image, text, scale, bias)


# =============================================================================================
# The objective
# =============================================================================================
class Clip(Objective):
    """Image-text contrastive training of a two-tower model (`vitjax.models.clip`) on (image, text) batches.

        config.objective = "clip"
        config.objective_kwargs = dict(loss="softmax",   # CLIP; "sigmoid": SigLIP (the model needs a logit bias)
                                       max_scale=100.0)  # CLIP clips the temperature's inverse at 100 (None: no cap)

    The train batch holds "image" (B, H, W, C) and "text" int32 token ids (B, context_length), row i a
    pair (pp: `vitjax.text.ops`). The loss is computed shard by shard over the mesh's batch axes
    (`sharded_loss`). Eval metrics per example, against the other real examples of the eval batch:
    `loss` (the example's share of the batch loss) and `image_to_text_top1` (its most similar text is its
    own caption, or one with the same tokens).
    """

    batch_keys = ("image", "text")
    eval_batch_keys = ("image", "text")
    default_kwargs: Dict[str, Any] = dict(loss="softmax", max_scale=None)

    def __init__(self, config):
        super().__init__(config)
        self.loss_name = check_loss_name(self.kwargs["loss"])
        max_scale = self.kwargs["max_scale"]
        if max_scale is not None and (isinstance(max_scale, bool) or not isinstance(max_scale, (int, float))
                                      or max_scale <= 0):
            raise ValueError(f"objective_kwargs.max_scale must be None or a number > 0, got {max_scale!r}")
        self.module = models.create(config.model_name, **model_overrides(config.model))
        missing = [name for name in ("encode_image", "encode_text", "context_length") if not hasattr(self.module, name)]
        if missing:
            raise ValueError(f"objective 'clip' needs a two-tower model (e.g. {models.list_models('clip')}); "
                             f"{config.model_name!r} has no {missing}")
        if self.loss_name == "sigmoid" and getattr(self.module, "init_logit_bias", None) is None:
            raise ValueError(f"objective_kwargs.loss='sigmoid' needs a model with a logit bias: set "
                             f"config.model.init_logit_bias (SigLIP: -10.0) for {config.model_name!r}")

    @staticmethod
    def check_batch(batch: Dict[str, Any]) -> None:
        """Raises ValueError unless the batch holds images and token ids with one batch size."""
        for key in ("image", "text"):
            if key not in batch:
                raise ValueError(f"objective 'clip' needs batch fields 'image' and 'text' (token ids, from the pp "
                                 f"op tokenize or label_caption + tokenize); the batch has {sorted(batch)}")
        images, tokens = batch["image"], batch["text"]
        if images.shape[0] != tokens.shape[0]:
            raise ValueError(f"The image batch ({images.shape[0]}) and the text batch ({tokens.shape[0]}) must "
                             "have the same size: row i of each is one image-text pair")
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"batch['text'] must be int token ids (batch, context_length), got {tokens.dtype} "
                             f"{tuple(tokens.shape)}")

    def example_batch(self, image):
        """Returns the image row and a zero row of token ids (1, context_length)."""
        import numpy as np
        return {"image": image, "text": np.zeros((1, self.module.context_length), np.int32)}

    def init_variables(self, rng: jax.Array, batch: Dict[str, Any]) -> Variables:
        """Returns the two-tower model's initial variables."""
        self.check_batch(batch)
        return dict(self.module.init({"params": rng}, batch["image"], batch["text"], train=False))

    def outputs(self, variables: Variables, batch: Dict[str, Any], train: bool = False,
                rng: Optional[jax.Array] = None) -> Dict[str, Any]:
        """Returns the model's dict(image, text, scale, bias) for the batch."""
        self.check_batch(batch)
        rngs = None
        if train:
            dropout_rng, drop_path_rng = jax.random.split(rng)
            rngs = {"dropout": dropout_rng, "drop_path": drop_path_rng}
        outputs, _ = self.module.apply(variables, batch["image"], batch["text"], train=train, rngs=rngs)
        if self.kwargs["max_scale"] is not None:
            # CLIP clamps exp(logit_scale) at 100 so the logits cannot blow up; above it the scale gets no gradient.
            outputs = {**outputs, "scale": jnp.minimum(outputs["scale"], float(self.kwargs["max_scale"]))}
        return outputs

    def train_loss(self, variables: Variables, batch: Dict[str, Any], rng: jax.Array
                   ) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (the contrastive loss over the global batch, {"metrics": loss, scale (, bias)})."""
        outputs = self.outputs(variables, batch, True, rng)
        loss = sharded_loss(self.loss_name, outputs["image"], outputs["text"], outputs["scale"], outputs["bias"])
        metrics = {"loss": loss, "scale": outputs["scale"]}
        if outputs["bias"] is not None:
            metrics["bias"] = outputs["bias"]
        return loss, {"metrics": metrics, "updates": {}}

    def eval_metrics(self, variables: Variables, batch: Dict[str, Any]) -> Dict[str, jax.Array]:
        """Returns per-example `loss` and `image_to_text_top1` against the batch's real examples."""
        outputs = self.outputs(variables, batch)
        mask = batch["mask"] if "mask" in batch else jnp.ones(batch["image"].shape[0], bool)
        bias = 0.0 if outputs["bias"] is None else outputs["bias"]
        logits = outputs["scale"] * (outputs["image"] @ outputs["text"].T) + bias
        valid = mask[None, :] & mask[:, None]
        diagonal = jnp.eye(logits.shape[0], dtype=bool)
        if self.loss_name == "softmax":
            masked = jnp.where(mask[None, :], logits, -jnp.inf)
            rows = jnp.sum(jnp.where(diagonal, jax.nn.log_softmax(masked, axis=1), 0.0), axis=1)
            columns = jnp.sum(jnp.where(diagonal, jax.nn.log_softmax(jnp.where(mask[:, None], logits, -jnp.inf),
                                                                     axis=0), 0.0), axis=0)
            loss = -(rows + columns) / 2
        else:
            signs = jnp.where(diagonal, 1.0, -1.0)
            loss = -jnp.sum(jnp.where(valid, jax.nn.log_sigmoid(signs * logits), 0.0), axis=1)
        best = jnp.argmax(jnp.where(mask[None, :], logits, -jnp.inf), axis=1)
        same_text = jnp.all(batch["text"][best] == batch["text"], axis=1)
        return {"loss": jnp.where(mask, loss, 0.0), "image_to_text_top1": same_text.astype(jnp.float32)}

    def encode_image(self, variables: Variables, images: jax.Array) -> jax.Array:
        """Returns (B, E) unit-norm fp32 image features."""
        return self.module.apply(variables, images, method="encode_image").astype(jnp.float32)

    def encode_text(self, variables: Variables, tokens: jax.Array) -> jax.Array:
        """Returns (B, E) unit-norm fp32 text features."""
        return self.module.apply(variables, tokens, method="encode_text").astype(jnp.float32)

    def features(self, variables: Variables, images: jax.Array) -> jax.Array:
        """Returns the image tower's unit-norm embeddings (for the kNN and few-shot evaluators)."""
        return self.encode_image(variables, images)
