"""Deep metric learning with proxies: Proxy-Anchor on an L2-normalised embedding, and the semantic proxies that Ren
et al. (ICLR 2024, "Learning Semantic Proxies from Visual Prompts for Parameter-Efficient Fine-Tuning in Deep Metric
Learning") build from class-specific visual prompts.

    config.objective = "proxy_dml"
    config.objective_kwargs = dict(num_classes=100, embed_dim=384, proxies="semantic")
    config.adapt = dict(method="vpt", num_tokens=10, deep=True, train=(r"^dml/", r"/bias$"))

The model (any registered ViT with the adaptation hook, built without a classifier head) gives its pooled
features; the objective's embedding head (LayerNorm, then Dense to `embed_dim`, as the official `fc_norm` +
`head`) maps them to the embedding, L2-normalised: what `features` returns for retrieval (`recall_at_k`).

Loss (the official `criteria/dml_proxy_peft.py`, `proxy_data_range="both_all"`): with s = cos(embedding, proxy),
per proxy c (mode "anchor") log(1 + sum over the batch's positives of exp(-pos_alpha (s - pos_delta))) plus
log(1 + sum over its negatives of exp(neg_alpha (s - neg_delta))), each term averaged over all proxies (a proxy
without positives in the batch counts 0, as the official code; the Proxy-Anchor paper divides by the proxies with
positives instead). Mode "nca" sums over the proxies per example and averages over the batch.

Proxies: "learnable" is plain Proxy-Anchor, the proxies `dml/proxies` (classes, embed_dim) are parameters.
"semantic" is the paper's (its `proxy_mix_bias` with `semantic_mix_type="gru_relu"`):
  1. the frozen backbone runs a second time on the batch, each image with its class's prompts in every layer
     (`dml/class_prompts` (depth, classes, num_proxy_prompts, width); through the model's `vpt` hook with
     per-example prompts, no shared VPT prompts), its pooled features through a separate head
     (`dml/proxy_norm`, `dml/proxy_embed`) and L2-normalised;
  2. a GRU cell (`dml/gru_*`, ReLU candidate for "gru_relu", tanh for "gru") folds each image's vector into
     its class's row of a memory (`dml_state/container`, not a parameter), in batch order; the memory is
     L2-normalised and kept, without gradient, for the next step;
  3. the proxies are proxy_bias_ratio * `dml/proxies` + (1 - proxy_bias_ratio) * memory; the gradient reaches
     the GRU, the proxy head and the class prompts through the rows of this batch's classes.
The official code folds in a batch of k images per class laid out class by class (its sampler); here each
image updates its class's row in batch order, which is the same for such batches and defined for any batch.
The official learnable proxies train at `lr_proxy` (10-20x the others): `optim.lr_mult` does that here.

Settings (`objective_kwargs`): num_classes (training classes = proxies), embed_dim, proxies, mode, pos_alpha,
neg_alpha, pos_delta, neg_delta (the official defaults 32, 32, 0.1, -0.1), proxy_bias_ratio, num_proxy_prompts,
semantic_mix.
"""
import dataclasses
import math
import re
from typing import Any, Dict, Tuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

import vitjax.models as models
from vitjax import adapt as adapt_lib
from vitjax import weights
from vitjax.objectives.base import Objective, Variables, model_overrides

PROXIES = ("semantic", "learnable")
MODES = ("anchor", "nca")
SEMANTIC_MIXES = ("gru_relu", "gru")
STATE = "dml_state"   # the non-param collection of the semantic proxies' memory


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """Returns x / max(|x|, eps) along `axis` (torch's F.normalize)."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def _log1p_masked_sum_exp(logits: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
    """Returns log(1 + sum over the masked entries of exp(logits)) along `axis` (0 where none is masked)."""
    masked = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    zeros = jnp.zeros_like(jnp.take(masked, jnp.array([0]), axis=axis))
    return jax.nn.logsumexp(jnp.concatenate([masked, zeros], axis=axis), axis=axis)


def proxy_loss(embeddings: jax.Array, proxies: jax.Array, labels: jax.Array, *, mode: str = "anchor",
               pos_alpha: float = 32.0, neg_alpha: float = 32.0, pos_delta: float = 0.1,
               neg_delta: float = -0.1) -> jax.Array:
    """Returns the scalar Proxy-Anchor ("anchor") or Proxy-NCA-style ("nca") loss of (B, E) embeddings, (C, E)
    proxies (both normalised here) and (B,) integer labels."""
    if mode not in MODES:
        raise ValueError(f"Unknown proxy loss mode {mode!r}; valid choices: {list(MODES)}")
    similarity = l2_normalize(embeddings) @ l2_normalize(proxies).T
    positive = labels[:, None] == jnp.arange(proxies.shape[0])[None, :]
    axis = 0 if mode == "anchor" else 1
    pos = _log1p_masked_sum_exp(-pos_alpha * (similarity - pos_delta), positive, axis)
    neg = _log1p_masked_sum_exp(neg_alpha * (similarity - neg_delta), ~positive, axis)
    return pos.mean() + neg.mean()


def gru_cell(params: Dict[str, jax.Array], x: jax.Array, h: jax.Array, mix: str = "gru_relu") -> jax.Array:
    """Returns the next state of the official `Simple_GRUCell` (gates r, z; candidate ReLU or tanh; no dropout)."""
    width = h.shape[-1]
    gates_x = x @ params["gru_input"]
    gates_h = h @ params["gru_hidden"]
    bias = params["gru_bias"]
    reset = jax.nn.sigmoid(gates_x[..., :width] + gates_h[..., :width] + bias[:width])
    update = jax.nn.sigmoid(gates_x[..., width:2 * width] + gates_h[..., width:2 * width] + bias[width:2 * width])
    candidate = gates_x[..., 2 * width:] + reset * gates_h[..., 2 * width:] + bias[2 * width:]
    candidate = jax.nn.relu(candidate) if mix == "gru_relu" else jnp.tanh(candidate)
    return (1.0 - update) * candidate + update * h


def semantic_proxies(proxy_vectors: jax.Array, labels: jax.Array, container: jax.Array, bias: jax.Array,
                     gru_params: Dict[str, jax.Array], bias_ratio: float, mix: str = "gru_relu"
                     ) -> Tuple[jax.Array, jax.Array]:
    """Returns (proxies (C, E), the new normalised memory (C, E)): each (B, E) vector folded into its class's
    memory row by the GRU in batch order, then mixed with the learnable proxies `bias`."""

    def fold(memory, inputs):
        vector, label = inputs
        return memory.at[label].set(gru_cell(gru_params, vector, memory[label], mix)), None

    memory, _ = jax.lax.scan(fold, container, (proxy_vectors, labels))
    memory = l2_normalize(memory)
    return bias * bias_ratio + memory * (1.0 - bias_ratio), memory


def _xavier_uniform(scale: float = 1.0):
    def init(key, shape, dtype=jnp.float32):
        bound = scale * math.sqrt(6.0 / (shape[0] + shape[1]))
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _stacked_squares(key, shape, dtype=jnp.float32):
    # The official GRU's three (E, E) matrices (reset, update, candidate), each xavier-uniform, side by side.
    return jnp.concatenate([_xavier_uniform()(k, (shape[0], shape[0]), dtype) for k in jax.random.split(key, 3)], 1)


def _class_prompt_init(key, shape, dtype=jnp.float32):
    # torch's xavier_normal_ of one layer's (classes, prompts, width): fan_in prompts * width, fan_out classes * width.
    _, classes, prompts, width = shape
    return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / (prompts * width + classes * width))


class ProxyHeads(nn.Module):
    """The objective's own parameters: embedding head, proxies and (semantic) the proxy branch's head, class
    prompts and GRU."""
    num_classes: int
    embed_dim: int
    semantic: bool
    width: int = 0
    depth: int = 0
    num_prompts: int = 0

    def setup(self):
        self.embed_norm = nn.LayerNorm(epsilon=1e-5)
        self.embed_dense = nn.Dense(self.embed_dim, kernel_init=_xavier_uniform())
        # Official: xavier_uniform / 8.
        self.proxies = self.param("proxies", _xavier_uniform(1.0 / 8.0), (self.num_classes, self.embed_dim))
        if self.semantic:
            self.proxy_norm = nn.LayerNorm(epsilon=1e-5)
            self.proxy_dense = nn.Dense(self.embed_dim, kernel_init=_xavier_uniform())
            self.class_prompts = self.param("class_prompts", _class_prompt_init,
                                            (self.depth, self.num_classes, self.num_prompts, self.width))
            self.gru_input = self.param("gru_input", _stacked_squares, (self.embed_dim, 3 * self.embed_dim))
            self.gru_hidden = self.param("gru_hidden", _stacked_squares, (self.embed_dim, 3 * self.embed_dim))
            self.gru_bias = self.param("gru_bias", nn.initializers.zeros, (3 * self.embed_dim,))

    def __call__(self, pooled: jax.Array) -> jax.Array:
        """Returns the normalised embedding (init touches every parameter)."""
        if self.semantic:
            self.proxy_vectors(pooled)
        return self.embed(pooled)

    def embed(self, pooled: jax.Array) -> jax.Array:
        """Returns the L2-normalised (B, embed_dim) embedding of pooled backbone features."""
        return l2_normalize(self.embed_dense(self.embed_norm(pooled)))

    def proxy_vectors(self, pooled: jax.Array) -> jax.Array:
        """Returns the L2-normalised (B, embed_dim) proxy-branch vectors of its pooled features."""
        return l2_normalize(self.proxy_dense(self.proxy_norm(pooled)))


class ProxyDML(Objective):
    """Proxy-based deep metric learning (Proxy-Anchor; the semantic proxies of visual prompts)."""

    batch_keys = ("image", "label")
    default_kwargs: Dict[str, Any] = dict(
        num_classes=None, embed_dim=384, proxies="semantic", mode="anchor", pos_alpha=32.0, neg_alpha=32.0,
        pos_delta=0.1, neg_delta=-0.1, proxy_bias_ratio=0.5, num_proxy_prompts=3, semantic_mix="gru_relu")

    def __init__(self, config):
        super().__init__(config)
        kw = self.kwargs
        for name, choices in (("proxies", PROXIES), ("mode", MODES), ("semantic_mix", SEMANTIC_MIXES)):
            if kw[name] not in choices:
                raise ValueError(f"objective_kwargs.{name}={kw[name]!r} is not valid; valid choices: {list(choices)}")
        for name in ("num_classes", "embed_dim", "num_proxy_prompts"):
            if isinstance(kw[name], bool) or not isinstance(kw[name], int) or kw[name] < 1:
                raise ValueError(f"objective_kwargs.{name} must be an int >= 1 (the training classes, the embedding "
                                 f"width, the prompts per class and layer), got {kw[name]!r}")
        if not 0.0 <= kw["proxy_bias_ratio"] <= 1.0:
            raise ValueError(f"objective_kwargs.proxy_bias_ratio must be in [0, 1], got {kw['proxy_bias_ratio']!r}")
        overrides = model_overrides(config.model)
        overrides["num_classes"] = 0  # the embedding head is the objective's
        self.module = models.create(config.model_name, **overrides)
        self.num_classes = kw["num_classes"]
        self.semantic = kw["proxies"] == "semantic"
        self.proxy_module = None
        if self.semantic:
            # The proxy branch: the same backbone, each image with its class's prompts in every layer.
            self.proxy_module = adapt_lib.attach(self.module, dict(method="vpt", num_tokens=kw["num_proxy_prompts"],
                                                                   deep=True))
        self.heads = ProxyHeads(kw["num_classes"], kw["embed_dim"], self.semantic,
                                width=int(getattr(self.module, "embed_dim", 0)),
                                depth=int(getattr(self.module, "depth", 0)), num_prompts=kw["num_proxy_prompts"])
        settings = config.get("adapt") if hasattr(config, "get") else None
        method = adapt_lib.parse(settings) if settings is not None else None
        if method is not None and self.semantic and method.name != "vpt":
            raise ValueError(f"Semantic proxies run the backbone with class prompts through the 'vpt' hook, which "
                             f"config.adapt.method={method.name!r} would not see; valid choices with "
                             "objective_kwargs.proxies='semantic': ['vpt', None] (or proxies='learnable')")
        if method is not None:
            trained = adapt_lib.trained_patterns(method, tuple(settings.get("train", adapt_lib.DEFAULT_TRAIN)))
            if not any(re.search(pattern, "dml/proxies") for pattern in trained):
                raise ValueError(f"config.adapt.train {list(settings.get('train'))} leaves the objective's own "
                                 "parameters (dml/: embedding head, proxies) frozen; add r'^dml/' to it")

    # ---- variables -------------------------------------------------------------------------------
    def init_variables(self, rng: jax.Array, batch: Dict[str, Any]) -> Variables:
        """Returns the backbone's variables with the objective's params under "dml" and the proxy memory."""
        model_rng, head_rng, memory_rng = jax.random.split(rng, 3)
        variables = dict(self.module.init({"params": model_rng}, batch["image"], train=False))
        width = int(self.module.embed_dim)
        heads = self.heads.init(head_rng, jnp.zeros((1, width), jnp.float32))
        params = dict(variables.pop("params"))
        params["dml"] = heads["params"]
        if self.semantic:
            shape = (self.num_classes, self.kwargs["embed_dim"])
            variables[STATE] = {"container": l2_normalize(_xavier_uniform(1.0 / 8.0)(memory_rng, shape))}
        return {"params": params, **variables}

    def init_from_rules(self) -> weights.Rules:
        """Returns the base rules with the objective's params new and the checkpoint's classifier head dropped."""
        rules = super().init_from_rules()
        return dataclasses.replace(rules, optional=tuple(rules.optional) + (r"^dml/",),
                                   ignore=tuple(rules.ignore) + (r"^head(_dist)?/",))

    @staticmethod
    def _split(variables: Variables) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
        """Returns (the backbone's variables, the objective's params, the proxy memory collection)."""
        params = dict(variables["params"])
        own = params.pop("dml")
        backbone = {"params": params, **{k: v for k, v in variables.items() if k not in ("params", STATE)}}
        return backbone, own, variables.get(STATE)

    def _pooled(self, module, variables, images, train, rng):
        rngs = None
        if train:
            dropout_rng, drop_path_rng = jax.random.split(rng)
            rngs = {"dropout": dropout_rng, "drop_path": drop_path_rng}
        pooled, _ = module.apply(variables, images, train=train, rngs=rngs)
        return pooled.astype(jnp.float32)

    def embeddings(self, variables: Variables, images: jax.Array, train: bool = False, rng=None) -> jax.Array:
        """Returns the (B, embed_dim) L2-normalised embeddings of the images."""
        backbone, own, _ = self._split(variables)
        pooled = self._pooled(self.module, backbone, images, train, rng)
        return self.heads.apply({"params": own}, pooled, method=ProxyHeads.embed)

    def proxies(self, variables: Variables, images=None, labels=None, train: bool = False, rng=None
                ) -> Tuple[jax.Array, Any]:
        """Returns (the (C, embed_dim) proxies, the new memory or None); semantic proxies need the batch."""
        backbone, own, state = self._split(variables)
        if not self.semantic or images is None:
            return own["proxies"], None
        params = {k: v for k, v in backbone["params"].items() if k != "vpt"}
        prompts = own["class_prompts"][:, labels]  # (depth, B, P, W): each image's class prompts
        prompted = dict(backbone, params={**params, "vpt": {"prompts": prompts[0], "deep_prompts": prompts[1:]}})
        pooled = self._pooled(self.proxy_module, prompted, images, train, rng)
        vectors = self.heads.apply({"params": own}, pooled, method=ProxyHeads.proxy_vectors)
        gru_params = {name: own[name] for name in ("gru_input", "gru_hidden", "gru_bias")}
        return semantic_proxies(vectors, labels, state["container"], own["proxies"], gru_params,
                                float(self.kwargs["proxy_bias_ratio"]), self.kwargs["semantic_mix"])

    def loss_of(self, embeddings: jax.Array, proxies: jax.Array, labels: jax.Array) -> jax.Array:
        """Returns the configured proxy loss."""
        kw = self.kwargs
        return proxy_loss(embeddings, proxies, labels, mode=kw["mode"], pos_alpha=kw["pos_alpha"],
                          neg_alpha=kw["neg_alpha"], pos_delta=kw["pos_delta"], neg_delta=kw["neg_delta"])

    # ---- the trainer's interface -----------------------------------------------------------------
    def train_loss(self, variables: Variables, batch: Dict[str, Any], rng: jax.Array
                   ) -> Tuple[jax.Array, Dict[str, Any]]:
        """Returns (proxy loss, {"metrics": loss and proxy_top1, "updates": the semantic proxies' memory})."""
        chex.assert_rank(batch["image"], 4)
        chex.assert_shape(batch["label"], (batch["image"].shape[0], self.num_classes))
        labels = jnp.argmax(batch["label"], axis=-1)
        embed_rng, proxy_rng = jax.random.split(rng)
        embeddings = self.embeddings(variables, batch["image"], True, embed_rng)
        proxies, memory = self.proxies(variables, batch["image"], labels, True, proxy_rng)
        loss = self.loss_of(embeddings, proxies, labels)
        top1 = jnp.mean(jnp.argmax(embeddings @ l2_normalize(proxies).T, -1) == labels)
        updates = {} if memory is None else {STATE: {"container": jax.lax.stop_gradient(memory)}}
        return loss, {"metrics": {"loss": loss, "proxy_top1": top1}, "updates": updates}

    def eval_metrics(self, variables: Variables, batch: Dict[str, Any]) -> Dict[str, jax.Array]:
        """Returns per-example {"proxy_top1"}: the nearest learnable proxy is the label's (seen classes only)."""
        chex.assert_rank(batch["label"], 1)
        embeddings = self.embeddings(variables, batch["image"])
        proxies, _ = self.proxies(variables)
        nearest = jnp.argmax(embeddings @ l2_normalize(proxies).T, -1)
        return {"proxy_top1": (nearest == batch["label"]).astype(jnp.float32)}

    def features(self, variables: Variables, images: jax.Array) -> jax.Array:
        """Returns the (B, embed_dim) normalised embeddings: what retrieval ranks by cosine similarity."""
        return self.embeddings(variables, images)
