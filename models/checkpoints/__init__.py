"""Checkpoints: load and save safely, recognise other networks' files, the embedded zoo, plugins."""
