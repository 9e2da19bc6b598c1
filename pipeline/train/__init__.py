"""Training-side library code: annotated data sets and targets, unlabelled tiles for
distillation, the training loop, post-processing tuning, evaluation, metrics, model cards."""
