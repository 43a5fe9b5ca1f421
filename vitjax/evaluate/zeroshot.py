"""Image-text evaluators for `config.evals`: zero-shot classification with prompt ensembles, and retrieval.

    config.evals = dict(
        zeroshot=dict(kind="zeroshot", classnames="imagenet", templates="imagenet"),   # CLIP's 80 prompts
        retrieval=dict(kind="retrieval", dataset="coco_captions", split="val"),       # pp makes "text"
    )

They need an objective with `encode_image(variables, images)` and `encode_text(variables, tokens)`
(unit-norm features), as `objective="clip"` has.

zeroshot   Each class's embedding is the mean of the unit-norm text embeddings of its captions, every
           template filled with the class name, normalised again (CLIP's prompt ensemble,
           Radford et al. 2021, Sec. 3.1.4); an image is classified by its most similar class.
           Settings: `classnames`, `templates` (set names of `vitjax.text.templates`, or lists),
           `tokenizer` ("clip"), `tokenizer_kwargs` (context_length defaults to the model's).
           Metrics: top1, top5, num_examples.
retrieval  Image->text and text->image recall@K (K = 1, 5, 10) over the split's (image, "text") pairs,
           features of every real example gathered first. The texts are the split's distinct captions
           (equal token ids are one text); an image matches the text of its own caption, a text every
           image it captions: with distinct captions this is the usual one-caption-per-image protocol,
           with captions from class templates an image matches its class's caption. Ties count in the
           query's favour, as top-k accuracy does. Setting: `max_examples` (None: all).
           Metrics: image_to_text_recall@K, text_to_image_recall@K, num_examples, num_texts.
"""
from typing import Any, Dict, List, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.evaluate.evaluators import Evaluator, register_evaluator

RECALL_AT = (1, 5, 10)


def _needs_encoders(context) -> None:
    objective = context.objective
    missing = [name for name in ("encode_image", "encode_text") if not hasattr(objective, name)]
    if missing:
        raise ValueError(f"The zeroshot and retrieval evaluators need an objective that encodes images and texts "
                         f"(objective='clip'); {type(objective).__name__} has no {missing}")


def _variables(state) -> Dict[str, Any]:
    return {"params": state.params, **state.model_state}


def class_embeddings(encode_text, tokens: np.ndarray, batch_size: int) -> np.ndarray:
    """Returns (classes, E) unit-norm class embeddings: the normalised mean of each class's caption embeddings.

    `tokens` is (classes, templates, context_length); `encode_text(tokens (n, L)) -> (n, E)` unit-norm.
    """
    num_classes, num_templates, length = tokens.shape
    flat = tokens.reshape(-1, length)
    padded = -len(flat) % batch_size
    flat = np.concatenate([flat, np.zeros((padded, length), flat.dtype)]) if padded else flat
    features = np.concatenate([np.asarray(encode_text(flat[start:start + batch_size]))
                               for start in range(0, len(flat), batch_size)])[:num_classes * num_templates]
    mean = features.reshape(num_classes, num_templates, -1).astype(np.float64).mean(axis=1)
    return (mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def recall_at_k(similarity: np.ndarray, matches: np.ndarray, ks=RECALL_AT) -> Dict[int, float]:
    """Returns {k: fraction of query rows whose best-ranked match is among the k most similar columns}.

    The rank of a match is the number of columns strictly more similar than it (ties in the query's favour).
    """
    best_match = np.max(np.where(matches, similarity, -np.inf), axis=1)
    rank = np.sum(similarity > best_match[:, None], axis=1)
    return {k: float(np.mean(rank < k)) for k in ks}


class ZeroShot(Evaluator):
    """Zero-shot classification: images against class embeddings from prompt ensembles."""

    default_settings: Dict[str, Any] = dict(classnames="imagenet", templates="imagenet", tokenizer="clip",
                                            tokenizer_kwargs={}, max_batches=None)

    @classmethod
    def check_settings(cls, name: str, settings: Mapping[str, Any]) -> None:
        from vitjax.text import templates  # pylint: disable=g-import-not-at-top
        try:
            templates.captions(settings["classnames"], settings["templates"])
        except ValueError as error:
            raise ValueError(f"config.evals.{name}: {error}") from None
        if not isinstance(settings["tokenizer_kwargs"], Mapping):
            raise ValueError(f"config.evals.{name}.tokenizer_kwargs must be a dict, got {settings['tokenizer_kwargs']!r}")

    def __init__(self, name, settings, context):
        super().__init__(name, settings, context)
        _needs_encoders(context)
        from vitjax import parallel  # pylint: disable=g-import-not-at-top
        import vitjax.text as text  # pylint: disable=g-import-not-at-top
        from vitjax.text import templates  # pylint: disable=g-import-not-at-top
        objective = context.objective
        captions = templates.captions(self.settings["classnames"], self.settings["templates"])
        kwargs = dict(self.settings["tokenizer_kwargs"])
        kwargs.setdefault("context_length", int(objective.module.context_length))
        tokenize = text.tokenizer(self.settings["tokenizer"], **kwargs)
        self.tokens = np.stack([np.asarray(tokenize(list(row)), np.int32) for row in captions])
        replicated = parallel.replicated(context.mesh)
        self.encode_text = jax.jit(lambda state, tokens: objective.encode_text(_variables(state), tokens),
                                   in_shardings=(context.state_shardings, context.batch_sharding),
                                   out_shardings=replicated)

        def classify(state, batch, classes):
            logits = objective.encode_image(_variables(state), batch["image"]) @ classes.T
            labels = batch["label"].astype(jnp.int32)
            label_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)
            rank = jnp.sum(logits > label_logit, axis=1)
            mask = batch["mask"].astype(jnp.float32)
            return jnp.sum((rank < 1) * mask), jnp.sum((rank < 5) * mask), jnp.sum(mask)

        self.classify = jax.jit(classify, in_shardings=(context.state_shardings, context.batch_sharding, replicated),
                                out_shardings=replicated)

    def evaluate(self, state) -> Dict[str, float]:
        """Returns top1 / top5 of zero-shot classification over the split's real examples."""
        from vitjax import parallel  # pylint: disable=g-import-not-at-top
        sharding = parallel.batch_sharding(self.context.mesh)
        classes = class_embeddings(
            lambda tokens: self.encode_text(state, jax.device_put(tokens, sharding)), self.tokens, self.batch_size)
        top1 = top5 = count = 0.0
        for index, batch in enumerate(self.batches(("image", "label"))):
            if self.settings["max_batches"] is not None and index >= self.settings["max_batches"]:
                break
            correct1, correct5, real = jax.device_get(self.classify(state, batch, classes))
            top1, top5, count = top1 + float(correct1), top5 + float(correct5), count + float(real)
        return {"top1": top1 / count, "top5": top5 / count, "num_examples": int(count)}


class Retrieval(Evaluator):
    """Image<->text retrieval recall@1/5/10 over the (image, "text") pairs of a split."""

    default_settings: Dict[str, Any] = dict(max_examples=None)

    def __init__(self, name, settings, context):
        super().__init__(name, settings, context)
        _needs_encoders(context)
        objective = context.objective
        from vitjax import parallel  # pylint: disable=g-import-not-at-top

        def encode(state, batch):
            variables = _variables(state)
            return (objective.encode_image(variables, batch["image"]), objective.encode_text(variables, batch["text"]),
                    batch["text"], batch["mask"])

        self.encode = jax.jit(encode, in_shardings=(context.state_shardings, context.batch_sharding),
                              out_shardings=parallel.replicated(context.mesh))

    def evaluate(self, state) -> Dict[str, float]:
        """Returns image_to_text_recall@K and text_to_image_recall@K (K = 1, 5, 10) and num_examples."""
        parts: List[tuple] = []
        limit = self.settings["max_examples"]
        count = 0
        for batch in self.batches(("image", "text")):
            images, texts, tokens, mask = jax.device_get(self.encode(state, batch))
            mask = np.asarray(mask, bool)
            parts.append((np.asarray(images)[mask], np.asarray(texts)[mask], np.asarray(tokens)[mask]))
            count += int(mask.sum())
            if limit is not None and count >= limit:
                break
        images, texts, tokens = (np.concatenate(column)[:limit] for column in zip(*parts))
        # Texts are the distinct captions: a duplicate would only push the others down the ranking.
        _, first, caption_ids = np.unique(tokens, axis=0, return_index=True, return_inverse=True)
        caption_ids = caption_ids.reshape(-1)
        similarity = images.astype(np.float64) @ texts[first].astype(np.float64).T
        matches = caption_ids[:, None] == np.arange(len(first))[None, :]
        result: Dict[str, float] = {}
        for k, value in recall_at_k(similarity, matches).items():
            result[f"image_to_text_recall@{k}"] = value
        for k, value in recall_at_k(similarity.T, matches.T).items():
            result[f"text_to_image_recall@{k}"] = value
        result["num_examples"] = int(len(images))
        result["num_texts"] = int(len(first))
        return result


register_evaluator("zeroshot", ZeroShot)
register_evaluator("retrieval", Retrieval)
