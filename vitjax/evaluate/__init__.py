"""Evaluation: classification (loss, top-1, top-5 over a padded eval split)."""
