"""Training: `python -m models.train` and `models.train_hybrid`, distillation, the model card."""
