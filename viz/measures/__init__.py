"""Measures on maps: agreement, deletion/insertion, localisation, the sanity check, statistics."""
