"""The class the user picked to explain, per image and model."""

from __future__ import annotations

import streamlit as st

from . import keys
from .context import OTHER, ImageItem


def chosen_target(item: ImageItem, ckpt) -> int | None:
    """The class the user picked for this image and model (None: the top-1 prediction)."""
    choice = st.session_state.get(keys.target(item, ckpt))
    if choice == OTHER:
        choice = st.session_state.get(keys.target_search(item, ckpt))
    return None if choice is None else int(choice)
