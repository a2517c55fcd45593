"""The sidebar: the model (embedded, uploaded, or a path on the server) with its class names,
the CAM method and its layers, and how maps are drawn (one `FigureSettings` for the screen,
every download, the zip and its manifest)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import streamlit as st

import models
import viz

from . import keys
from .caching import load_path, model_from_bytes, model_from_path, policy
from .context import USER_ERRORS, ModelOption
from .widgets import state

CMAPS = tuple(
    dict.fromkeys((viz.DEFAULT_CMAP, "viridis", "inferno", "magma", "cividis", "turbo", "gray"))
)


def choose_model(errors) -> tuple[str, models.Checkpoint | None, dict[str, ModelOption]]:
    """Sidebar: embedded, uploaded or server-path checkpoints. Returns (label, ckpt, options)."""
    embedded = models.embedded_checkpoints()
    options = {
        e.label: ModelOption(
            f"embedded {e.path.name}", lambda e=e: model_from_path(str(e.path), e.mtime, e.size)
        )
        for e in embedded
        if e.error is None
    }
    for e in embedded:
        if e.error:
            errors.warning(viz.md_text(e.error))
    extra: dict[str, ModelOption] = state(keys.EXTRA_MODELS, {})  # this session's own
    options.update(extra)

    st.sidebar.header("Model")
    picker = st.sidebar.container()  # filled below, once uploads have been read
    with st.sidebar.expander("Add a checkpoint", expanded=not options):
        _upload_checkpoint(options, extra, errors)
        _checkpoint_path(options, extra, errors)
    if not embedded:
        errors.info(
            f"No embedded checkpoint in {viz.md_text(models.checkpoint_dir())} yet: upload a "
            "checkpoint or give a path on the server in the sidebar."
        )
    if not options:
        return "", None, options
    labels = list(options)
    if st.session_state.get(keys.MODEL) not in labels:
        first = models.default_checkpoint(embedded)
        st.session_state[keys.MODEL] = first.label if first and first.label in labels else labels[0]
    label = picker.selectbox("Model in use", labels, key=keys.MODEL)
    with st.spinner(f"Loading {label}…"):
        ckpt = options[label].load()
    class_names_box(ckpt, errors)  # may give this session's names to the model
    ckpt = with_class_names(ckpt)
    rows = viz.describe_checkpoint(ckpt, source=options[label].source)
    picker.markdown("  \n".join(f"**{k}**: {viz.md_text(v)}" for k, v in rows.items()))
    return label, ckpt, options


def _upload_checkpoint(options: dict, extra: dict, errors) -> None:
    limit_mb = int(st.get_option("server.maxUploadSize"))
    shown = f"{limit_mb / 1024:g} GB" if limit_mb >= 1024 else f"{limit_mb} MB"
    upload = st.file_uploader(f"Upload a checkpoint (up to {shown})", key="ckpt_upload")
    if upload is None:
        return
    seen: dict = state(keys.CKPT_SEEN, {})  # file id -> None or its error
    if upload.file_id not in seen:
        try:
            viz.check_upload_size(upload.size, limit_mb * 2**20, upload.name)
            with st.spinner(f"Reading {upload.name}…"):
                data = upload.getvalue()
                ckpt = model_from_bytes(viz.digest(data), data)
            label = f"{ckpt.label} (upload {upload.name}, {ckpt.sha256[:8]})"
            extra[label] = options[label] = ModelOption(
                f"upload {upload.name}", lambda ckpt=ckpt: ckpt
            )
            seen[upload.file_id] = None
            st.session_state[keys.MODEL] = label
        except USER_ERRORS as exc:
            seen[upload.file_id] = f"{upload.name}: {exc}"
    if seen[upload.file_id]:
        errors.error(viz.md_text(seen[upload.file_id]))


def _checkpoint_path(options: dict, extra: dict, errors) -> None:
    path = ""
    if policy().server_paths:
        path = st.text_input("…or a checkpoint path on the server", key="ckpt_path").strip()
    if path and st.button("Load path", key="ckpt_path_load"):
        try:
            with st.spinner(f"Reading {path}…"):
                ckpt = load_path(path)
            label = f"{ckpt.label} ({Path(path).name}, {ckpt.sha256[:8]})"
            extra[label] = options[label] = ModelOption(path, lambda path=path: load_path(path))
            st.session_state[keys.MODEL] = label
        except USER_ERRORS as exc:
            errors.error(viz.md_text(f"{path}: {exc}"))


def with_class_names(ckpt: models.Checkpoint) -> models.Checkpoint:
    """The checkpoint with the class names this session gave it, if any (the model is shared)."""
    names = state(keys.CLASS_NAMES, {}).get(ckpt.sha256)
    return ckpt if names is None else dataclasses.replace(ckpt, class_names=names)


def class_names_box(ckpt: models.Checkpoint, errors) -> None:
    """Sidebar: give a model its class names (a state dict often has none: "class 0", ...)."""
    generic = ckpt.class_names == [f"class {i}" for i in range(len(ckpt.class_names))]
    given: dict = state(keys.CLASS_NAMES, {})
    with st.sidebar.expander("Class names", expanded=generic and ckpt.sha256 not in given):
        upload = st.file_uploader(
            f"A text file, one name per line ({len(ckpt.class_names)} lines)", type=["txt"],
            key=keys.names_file(ckpt), max_upload_size=1,
        )  # fmt: skip
        if upload is None or st.session_state.get(keys.NAMES_SEEN) == upload.file_id:
            return
        st.session_state[keys.NAMES_SEEN] = upload.file_id
        try:
            text = upload.getvalue().decode("utf-8-sig")
            given[ckpt.sha256] = viz.parse_class_names(text, len(ckpt.class_names), upload.name)
        except (UnicodeDecodeError, ValueError) as exc:
            errors.error(viz.md_text(f"{upload.name}: {exc}"))


def choose_method(ckpt, errors) -> tuple[str, list, int | None, bool]:
    """The sidebar's CAM method, its layers, its noisy samples (None: not a noisy method) and
    whether it gives one map for the whole network (no layers)."""
    st.sidebar.header("Class activation map")
    methods = viz.methods_for(ckpt.model) if ckpt else list(viz.CAM_METHODS)
    _keep_method_across_models(methods)
    method = st.sidebar.selectbox(
        "Method", methods, format_func=lambda m: viz.CAM_METHODS[m].label, key=keys.METHOD,
        help="rollout, GAE and LeGrad read a vision transformer's self-attention: one map "
             "for the whole network",
        on_change=lambda: st.session_state.pop(keys.METHOD_SET_ASIDE, None),
    )  # fmt: skip
    spec = viz.CAM_METHODS[method]
    if spec.same_for_every_class:  # Eigen-CAM, rollout: the class explained changes nothing
        what = "the attention" if spec.reads_attention else "the activations"
        st.sidebar.caption(f"{spec.label} reads {what} only: its map is the same for every class.")
    whole = spec.needs in ("network", "attention")  # one map, no layers
    layers = _layers_box(ckpt, method, whole)
    if whole:  # the greyed-out layers are kept for the next layer method, not used by this one
        layers = []
    elif ckpt:
        layers, note = viz.layers_for_method(ckpt.model, method, layers)
        if note:
            errors.info(viz.md_text(note))
    samples = None
    if method in viz.NUM_SAMPLES:
        samples = st.sidebar.number_input(
            "Noisy samples", 1, 1000, viz.NUM_SAMPLES[method], key=keys.num_samples(method),
            help="noisy copies per channel (SS-CAM, IS-CAM) or per image (SmoothGrad-CAM++); "
                 "the passes grow in proportion",
        )  # fmt: skip
    return method, layers, None if samples is None else int(samples), whole


def _keep_method_across_models(methods: list[str]) -> None:
    """A method the model in use lacks (rollout on a CNN) gives way to Grad-CAM, and comes back
    with a model that has it, unless another method was chosen meanwhile."""
    state = st.session_state
    if state.get(keys.METHOD) not in methods:
        state[keys.METHOD_SET_ASIDE] = state.get(keys.METHOD)
        state[keys.METHOD] = "gradcam"
    elif state.get(keys.METHOD_SET_ASIDE) in methods:
        state[keys.METHOD] = state.pop(keys.METHOD_SET_ASIDE)


def _layers_box(ckpt, method: str, whole: bool) -> list:
    choices = viz.cam_layer_choices(ckpt.model) if ckpt else []
    stages = viz.default_cam_layers(ckpt.model, method) if ckpt else []
    # one choice per model and default: the forward-per-channel methods start at the last stage
    key = keys.layers(ckpt, viz.CAM_METHODS[method].default_layers)
    kept = [name for name in st.session_state.get(keys.kept_layers(key), stages) if name in choices]
    layers = st.sidebar.multiselect(
        "Layers", choices, default=kept, key=key, disabled=whole,
        help="not used by this method: it gives one map for the whole network" if whole else None,
    )  # fmt: skip
    st.session_state[keys.kept_layers(key)] = layers
    return layers


def drawing(method: str, layers: list, samples: int | None, errors) -> viz.FigureSettings:
    """Sidebar: smoothing and how maps are drawn; with the method, this run's settings."""
    st.sidebar.header("Drawing")
    offered = viz.smoothings_for(method)
    if set(st.session_state.get(keys.SMOOTHING, [])) - set(offered):
        st.session_state[keys.SMOOTHING] = [
            s for s in st.session_state[keys.SMOOTHING] if s in offered
        ]
        errors.info(
            f"{viz.CAM_METHODS[method].label} is a principal component already (or has no "
            "channels): principal-component smoothing is off."
        )
    smoothing = st.sidebar.multiselect(
        "Smoothing", offered, key=keys.SMOOTHING,
        format_func={"aug": "augmentation (6x passes)", "eigen": "principal component"}.get,
        help="aug: the mean map over mirrored and brightened copies of the image; eigen: "
             "the first principal component of the weighted activations",
    )  # fmt: skip
    if keys.STOPPED in st.session_state:
        errors.info(st.session_state.pop(keys.STOPPED))
    return viz.FigureSettings(
        method=method,
        layers=tuple(layers) or None,
        smoothing=tuple(smoothing),
        num_samples=samples,
        cmap=st.sidebar.selectbox("Colour map", CMAPS, key="cmap"),
        alpha=st.sidebar.slider("Overlay opacity", 0.0, 1.0, 0.5, 0.05, key="alpha"),
        scale=st.sidebar.radio("Scale", viz.SCALES, horizontal=True, key="scale",
                               help="shared: one colour scale with real values; "
                                    "per-map: each map stretched to its own min-max"),
        width=st.sidebar.radio("Figure width", ["double", "single"], horizontal=True,
                               key="width", help="double: 6.9 in, single: 3.3 in (a paper column)"),
        dpi=st.sidebar.select_slider("Download dpi", [150, 300, 600], value=300, key="dpi"),
        render=st.sidebar.radio("Maps drawn", viz.RENDERS, horizontal=True, key="render",
                                help="smooth: enlarged bilinearly, as in the papers; cells: "
                                     "one flat block per map cell, the grid drawn"),
    )  # fmt: skip
