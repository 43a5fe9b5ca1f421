"""Evaluation: classification (loss, top-1, top-5 over a padded eval split), the trainer's evaluators, and
`python -m vitjax.evaluate` (any pretrained weights on a split, without training; see `pretrained`)."""
