"""`python -m models.card`: write the model card (`models.training.card`)."""

from models.training.card import main

if __name__ == "__main__":
    raise SystemExit(main())
