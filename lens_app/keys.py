"""Every session-state key the app uses, in one place: fixed names as constants, the keys that
depend on an image, a model or a method from named builders (a typo is a NameError, not a
silently fresh widget)."""

from __future__ import annotations

# widgets of the sidebar and the page
MODEL = "model"
METHOD = "method"
SMOOTHING = "smoothing"
VIEW = "view"
INSPECT = "inspect"
COMPARE = "compare"
GRID_STAGE = "grid_stage"
GRID_MAP = "grid_map"
DI_MAPS = "di_maps"

# what the app keeps per session (not widgets)
DOWNLOADS = "downloads"
PRERENDERED = "prerendered"
DRAWN = "drawn"
SLOW_ANALYSES = "slow_analyses"
SLOW_JOBS = "slow_jobs"
REPORT_JOB = "report_job"
STOPPED = "stopped"
LONG_RUNS = "long_runs"  # analyses measured too long to start unasked: key -> (passes, seconds)
LONG_RUNS_AGREED = "long_runs_agreed"  # (model, method, layers, smoothing, options) run on asking
RUN_LONG = "run_long"
BACK_TO_GRADCAM = "back_to_gradcam"
METHOD_SET_ASIDE = "method_set_aside"  # a method the model in use lacks, back with one that has it
EXTRA_MODELS = "extra_models"
CKPT_SEEN = "ckpt_seen"
CLASS_NAMES = "class_names"
NAMES_SEEN = "names_seen"
CAPTUM_RESULTS = "captum_results"
CLASS_STATS = "class_stats"
REPORTS = "reports"
DI_WHOLE = "di_whole"
DI_LAYER_PICKS = "di_layer_picks"
RELOAD_IMAGES = "reload_images"


def image_model(item, ckpt) -> str:
    """The short stamp of one image under one model (figure and download keys carry it)."""
    return f"{item.sha[:16]}:{ckpt.sha256[:16]}"


def target(item, ckpt) -> str:
    """The "Explain class" radio of this image and model."""
    return f"t5:{image_model(item, ckpt)}"


def explain(item, ckpt, what: str) -> str:
    """The choice of what a network that is not a classifier explains ("segment", "box",
    "concept") for this image and model."""
    return f"ex:{what}:{image_model(item, ckpt)}"


def target_search(item, ckpt) -> str:
    """The "Search all classes" box behind the radio's "another class…"."""
    return f"tall:{image_model(item, ckpt)}"


def layers(ckpt, default_layers: str) -> str:
    """The Layers box: one per model and per method default (see `kept_layers`)."""
    return f"layers:{ckpt.sha256 if ckpt else ''}:{default_layers}"


def kept_layers(layers_key: str) -> str:
    """The layers chosen in that box, kept apart from the widget (whose state Streamlit drops
    while the box of another default shows)."""
    return f"kept {layers_key}"


def num_samples(method: str) -> str:
    return f"num_samples:{method}"


def names_file(ckpt) -> str:
    return f"names_file:{ckpt.sha256[:16]}"


def figure_download(figure_key: str, fmt: str) -> str:
    return f"dl:{figure_key}:{fmt}"


def zip_download(stamp: str) -> str:
    return f"zip:{stamp}"


def captum_figure(stamp: str, method: str) -> str:
    return f"captum:{stamp}:{method}"


def captum_npz(stamp: str) -> str:
    return f"captum_dl:{stamp}"


def agreement_csv(prefix: str) -> str:
    return f"agree_csv:{prefix}"


def curves_figure(prefix: str) -> str:
    return f"di_fig:{prefix}"


def curves_csv(prefix: str) -> str:
    return f"di_csv:{prefix}"


def column_class(item) -> str:
    """The class of an image's column in the model comparison."""
    return f"colcls:{item.sha[:16]}"


def column_class_from(item) -> str:
    """The labels-CSV class that last set that column (a new CSV sets it again)."""
    return f"{column_class(item)}:from"


def stats_modules(ckpt) -> str:
    return f"stats_modules:{ckpt.sha256[:16]}"


def stats_figure(ckpt) -> str:
    return f"stats:{ckpt.sha256[:16]}"


def report_sanity(first: int) -> str:
    """The sanity-check count: one box per default, so a method's default shows."""
    return f"rep_sanity:{first}"


def report_file(name: str) -> str:
    return f"rep_dl:{name}"


def stop_button(stamp: int) -> str:
    """A Stop button of a slow run: new in every run (a stale click must not stop the next)."""
    return f"stop-slow:{stamp}"
