"""SiT: self-supervised vision transformer (Atito, Awais, Kittler 2021, "SiT: Self-supervised vIsion Transformer").
Official code: github.com/Sara-Ahmed/SiT (read and run, not copied).

GMML reconstruction (`vitjax.objectives.gmml`) plus a contrastive branch against a momentum teacher, as
the official `main.py`: two views of each image ("image_0", "image_1", e.g. from the pp op `views(2, ...)`)
are corrupted (zeros by default) and the student reconstructs the clean views from its final normed
tokens and projects its class token through `ProjectionHead` (Linear 4096, BatchNorm, ReLU, Linear 4096,
BatchNorm, GELU, Linear `out_dim`, BatchNorm without affine: the official `CLSHead`); the teacher, an
exponential moving average of every student parameter (heads too), projects the clean views. With
L2-normalised projections and temperature t, the contrastive loss is

    CE(s_0 . t_1^T / t, diagonal) * 2t + CE(s_1 . t_0^T / t, diagonal) * 2t

over the global batch: the keys are gathered over the mesh's batch axes ("data", "fsdp") with
`jax.lax.all_gather` inside `shard_map` (each device scores its own queries against every key, as the
official `concat_all_gather`). The loss is contrastive + `reconstruction_weight` x L1 on the corrupted pixels.

The teacher lives in the model-state collection "teacher" ({"params", "step"}) and its momentum follows
the official cosine from `momentum` to 1 over the run (`momentum_steps`, default config.total_steps).
One difference: the official update runs after the optimizer step with the new student weights; here it
runs inside the loss with the weights the step starts from (the teacher trails by one step).

`corruption_from="data"` (GMML's option) reads each view's corruption from the batch: put
`gmml_corrupt(0.5, "zeros")` at the end of the views' pp (fields "image_corrupted_0", "corruption_mask_0", ...)
and `input.gmml_replace`, which replaces groups across both views as one batch, as the device draw does.
"""
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from vitjax.models import layers
from vitjax.models.vit import VisionTransformer
from vitjax.objectives import gmml
from vitjax.objectives.base import Variables
from vitjax.objectives.mae import build_encoder

TEACHER = "teacher"


# =============================================================================================
# The contrastive loss
# =============================================================================================
def contrastive_loss(queries: jax.Array, keys: jax.Array, temperature: float) -> jax.Array:
    """Returns SiT's one-direction InfoNCE: CE(normalise(q) . normalise(k)^T / t, diagonal) x 2t (keys not
    differentiated)."""
    queries = _normalise(queries.astype(jnp.float32))
    keys = jax.lax.stop_gradient(_normalise(keys.astype(jnp.float32)))
    logits = queries @ keys.T / temperature
    labels = jnp.arange(queries.shape[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() * (2 * temperature)


def _normalise(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def contrastive_loss_shard(queries: jax.Array, keys: jax.Array, temperature: float,
                           axis_names: Tuple[str, ...]) -> jax.Array:
    """Returns the global `contrastive_loss` from this shard's rows (inside shard_map): keys all-gathered."""
    queries = _normalise(queries.astype(jnp.float32))
    keys = jax.lax.stop_gradient(_normalise(keys.astype(jnp.float32)))
    all_keys = jax.lax.all_gather(keys, axis_names, axis=0, tiled=True)
    local = queries.shape[0]
    logits = queries @ all_keys.T / temperature
    labels = jnp.arange(local) + local * jax.lax.axis_index(axis_names)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() * (2 * temperature)
    return jax.lax.pmean(loss, axis_names)


def sharded_contrastive_loss(queries: jax.Array, keys: jax.Array, temperature: float, *, mesh=None,
                             axis_names: Sequence[str] = ("data", "fsdp")) -> jax.Array:
    """Returns `contrastive_loss` of global (B, E) arrays computed shard by shard over `axis_names` of the mesh
    (the one set with `jax.set_mesh` by default); the full-matrix loss without a mesh or with one shard."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    axis_names = tuple(axis for axis in axis_names if mesh is not None and not mesh.empty and axis in mesh.axis_names)
    num_shards = math.prod(mesh.shape[axis] for axis in axis_names) if axis_names else 1
    if num_shards == 1:
        return contrastive_loss(queries, keys, temperature)
    if queries.shape[0] % num_shards:
        raise ValueError(f"The batch {queries.shape[0]} is not divisible by the {num_shards} shards of mesh axes "
                         f"{axis_names}")
    rows = PartitionSpec(axis_names)
    mapped = jax.shard_map(lambda q, k: contrastive_loss_shard(q, k, temperature, axis_names), mesh=mesh,
                           in_specs=(rows, rows), out_specs=PartitionSpec())
    return mapped(queries, keys)


def momentum_at(step: jax.Array, total_steps: int, base: float) -> jax.Array:
    """Returns the teacher momentum at `step`: a cosine from `base` to 1 over `total_steps` (the official schedule)."""
    progress = jnp.clip(step / max(total_steps, 1), 0.0, 1.0)
    return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


# =============================================================================================
# Modules
# =============================================================================================
class ProjectionHead(nn.Module):
    """SiT's projection head: Linear, BN, ReLU, (Linear, BN, GELU) x (num_layers - 2), Linear, BN without affine."""

    out_dim: int = 256
    hidden_dim: int = 4096
    num_layers: int = 3
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        def dense(width, name):
            return nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                            kernel_init=layers.logical(layers.trunc_normal_init, ("embed", "mlp")),
                            bias_init=layers.logical(nn.initializers.zeros, ("mlp",)))

        def norm(name, affine=True):
            return layers.BatchNorm(use_running_average=not train, use_scale=affine, use_bias=affine, name=name)

        if self.num_layers == 1:
            return dense(self.out_dim, "fc0")(x)
        x = nn.relu(norm("norm0")(dense(self.hidden_dim, "fc0")(x)))
        for index in range(1, self.num_layers - 1):
            x = layers.gelu(norm(f"norm{index}")(dense(self.hidden_dim, f"fc{index}")(x)))
        last = self.num_layers - 1
        return norm(f"norm{last}", affine=False)(dense(self.out_dim, f"fc{last}")(x))


class SiTModel(gmml.GroupMaskedModel):
    """GMML's encoder and reconstruction head plus the projection head on the class token.

    `__call__` returns (reconstruction (B, H, W, C) or None when `reconstruct` is False, aux with `projection`).
    """

    out_dim: int = 256
    hidden_dim: int = 4096
    num_layers: int = 3

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, reconstruct: bool = True
                 ) -> Tuple[Optional[jax.Array], Dict[str, jax.Array]]:
        tokens, aux = self.encode(images, train)
        reconstruction = None
        if reconstruct or self.is_initializing():
            reconstruction = gmml.ReconstructionHead(self.patch_size, self.encoder.in_chans, dtype=self.encoder.dtype,
                                                     param_dtype=self.encoder.param_dtype, name="rec_head")(
                tokens[:, self.encoder.num_prefix_tokens:], self.encoder.grid_size)
        aux["projection"] = ProjectionHead(self.out_dim, self.hidden_dim, self.num_layers, dtype=self.encoder.dtype,
                                           param_dtype=self.encoder.param_dtype, name="proj_head")(
            aux["tokens"][:, 0], train)
        return reconstruction, aux


# =============================================================================================
# The objective
# =============================================================================================
class SiT(gmml.GMML):
    """SiT pretraining; metrics: `loss`, `contrastive_loss`, `reconstruction_loss`, `teacher_momentum`."""

    batch_keys = ("image_0", "image_1")
    eval_batch_keys = ("image",)
    # The official main.py defaults: drop_perc 0.5, zeros, drop_replace 0.3 (probability 1/2), drop_align 1,
    # out_dim 256, simclr_temp 0.2, momentum_teacher 0.996, lmbda 1; reconstruction from the final tokens.
    default_kwargs: Dict[str, Any] = dict(
        gmml.GMML.default_kwargs, mask_ratio=0.5, corruption="zeros", recons_blocks=None, features_pool="token",
        out_dim=256, hidden_dim=4096, num_layers=3, temperature=0.2, momentum=0.996, momentum_steps=None,
        reconstruction_weight=1.0)

    def __init__(self, config):
        kwargs = dict(config.get("objective_kwargs") or {})
        if kwargs.get("recons_blocks") is None:
            # The official SiT reconstructs from the final tokens: the last block alone.
            depth = build_encoder(config, num_classes=0, global_pool="token").depth
            config = config.copy_and_resolve_references()
            config.objective_kwargs = dict(kwargs, recons_blocks=(depth,))
        super().__init__(config)
        for key in ("out_dim", "hidden_dim", "num_layers"):
            value = self.kwargs[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"objective_kwargs.{key} must be an int >= 1, got {value!r}")
        if not self.module.encoder.class_token:
            raise ValueError("SiT projects the class token: the encoder needs class_token=True")
        if not float(self.kwargs["temperature"]) > 0:
            raise ValueError(f"objective_kwargs.temperature must be > 0, got {self.kwargs['temperature']!r}")
        if not 0.0 <= float(self.kwargs["momentum"]) <= 1.0:
            raise ValueError(f"objective_kwargs.momentum must be in [0, 1], got {self.kwargs['momentum']!r}")
        # The official teacher is built without stochastic depth.
        self.teacher_module = self.module.clone(encoder=self.module.encoder.clone(drop_path_rate=0.0))
        self.momentum_steps = int(self.kwargs["momentum_steps"] or config.get("total_steps") or 0)
        if self.momentum_steps < 1:
            raise ValueError("SiT's teacher momentum runs over the training steps: set config.total_steps, or "
                             "objective_kwargs.momentum_steps when the run is counted in epochs")

    def build_module(self, encoder: VisionTransformer, recons_blocks: Tuple[int, ...]) -> nn.Module:
        """Returns the student: encoder, reconstruction head and projection head."""
        return SiTModel(encoder=encoder, recons_blocks=recons_blocks, out_dim=int(self.kwargs["out_dim"]),
                        hidden_dim=int(self.kwargs["hidden_dim"]), num_layers=int(self.kwargs["num_layers"]))

    def init_variables(self, rng: jax.Array, batch: Dict[str, Any]) -> Variables:
        """Returns the student's variables and the teacher ({"params": a copy of the student's, "step": 0})."""
        variables = dict(self.module.init({"params": rng}, batch["image_0"], train=False))
        teacher = {"params": jax.tree.map(lambda x: x, variables["params"]), "step": jnp.zeros((), jnp.int32)}
        return {**variables, TEACHER: teacher}

    @staticmethod
    def _student(variables: Variables) -> Variables:
        return {name: value for name, value in variables.items() if name != TEACHER}

    def train_loss(self, variables: Variables, batch: Dict[str, Any], rng: jax.Array
                   ) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (contrastive + weight x reconstruction, metrics and the updated teacher and batch statistics)."""
        corrupt_rng, dropout_rng, drop_path_rng = jax.random.split(rng, 3)
        clean, corrupted, mask = self.corrupted_batch(batch, corrupt_rng, ("image_0", "image_1"))
        student = self._student(variables)
        teacher = variables[TEACHER]
        # Both views in one batch, as the official forward: BatchNorm statistics over 2B rows.
        (reconstruction, aux), updates = self.module.apply(
            student, corrupted, train=True, mutable=["batch_stats"],
            rngs={"dropout": dropout_rng, "drop_path": drop_path_rng})
        # The teacher runs in train mode too (batch statistics; its running ones are never read).
        (_, teacher_aux), _ = self.teacher_module.apply(
            {**student, "params": teacher["params"]}, clean, train=True, reconstruct=False, mutable=["batch_stats"])
        temperature = float(self.kwargs["temperature"])
        student_0, student_1 = jnp.split(aux["projection"], 2)
        teacher_0, teacher_1 = jnp.split(jax.lax.stop_gradient(teacher_aux["projection"]), 2)
        contrastive = (sharded_contrastive_loss(student_0, teacher_1, temperature)
                       + sharded_contrastive_loss(student_1, teacher_0, temperature))
        reconstruction_loss = gmml.reconstruction_l1(reconstruction, clean,
                                                     mask if self.kwargs["masked_only"] else None)
        loss = contrastive + float(self.kwargs["reconstruction_weight"]) * reconstruction_loss
        momentum = momentum_at(teacher["step"], self.momentum_steps, float(self.kwargs["momentum"]))
        new_teacher = jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * jax.lax.stop_gradient(s),
                                   teacher["params"], student["params"])
        return loss, {"metrics": {"contrastive_loss": contrastive, "reconstruction_loss": reconstruction_loss,
                                  "teacher_momentum": momentum},
                      "updates": {**updates, TEACHER: {"params": new_teacher, "step": teacher["step"] + 1}}}

    def eval_metrics(self, variables: Variables, batch: Dict[str, Any]) -> Dict[str, jax.Array]:
        """Returns per-example {"loss"}: the student's L1 reconstruction loss under a fixed (seeded) corruption."""
        corrupted, mask = self.corrupt(jax.random.key(int(self.kwargs["eval_seed"])), batch["image"])
        reconstruction, _ = self.module.apply(self._student(variables), corrupted, train=False)
        return {"loss": gmml.per_example_l1(reconstruction, batch["image"], mask)}

    def features(self, variables: Variables, images: jax.Array) -> jax.Array:
        """Returns the student encoder's class token after the final norm ("token") or its mean patch token."""
        return super().features(self._student(variables), images)


__all__ = ["ProjectionHead", "SiT", "SiTModel", "contrastive_loss", "contrastive_loss_shard", "momentum_at",
           "sharded_contrastive_loss"]
