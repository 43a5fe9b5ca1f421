"""Distillation tools that run outside the train step: stored teacher predictions (TinyViT).

    python -m vitjax.distill.save_logits --config=configs/tiny_vit_distill.py:runlocal

`vitjax.distill.stored` is the store's format, writer checks and reader; the objective that reads it is
`vitjax.objectives.distill` with `objective_kwargs.teacher_logits=DIR`.
"""
