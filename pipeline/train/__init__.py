"""Training-side library code: the typed training config, annotated data sets and targets,
augmentation and patch sampling, unlabelled tiles for distillation, the training loop,
post-processing tuning, evaluation, metrics, model cards."""
