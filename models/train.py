"""`python -m models.train`: the training command (`models.training.cli`)."""

from models.training.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
