"""The command layer: `python -m viz export` and `report`, their inputs, files and pages.

Nothing below (engine, measures, figures) imports from here.
"""
