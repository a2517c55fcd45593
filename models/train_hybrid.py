"""`python -m models.train_hybrid`: train the hybrid CNN + ViT (`models.training.hybrid`)."""

from models.training.hybrid import main

if __name__ == "__main__":
    raise SystemExit(main())
