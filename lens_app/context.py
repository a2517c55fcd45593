"""What a view is given: one frozen `Context` per script run (the model, the images, the
chosen image, class and analysis, the drawing settings, where errors go)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from PIL import Image

import models
import viz

from . import keys
from .slow import SlowRun

# what a user can cause (a bad file, a bad choice): one line on the page, no traceback
USER_ERRORS = (models.CheckpointError, viz.ImageError, ValueError, OSError)
OTHER = -1  # the "another class" choice of the target radio


@dataclass(frozen=True)
class ImageItem:
    name: str
    data: bytes
    sha: str
    image: Image.Image


@dataclass(frozen=True)
class View:
    """How this page draws and names what it offers: the sidebar's settings, the model's stem."""

    settings: viz.FigureSettings
    prefix: str  # download file names start with it


@dataclass(frozen=True)
class Drawing:
    """How to draw one figure, and what it shows how (`key`: equal keys, the same figure; None:
    not kept, e.g. the maps of a slow method, which a session may compute anew)."""

    build: Callable[[], Any]  # -> a matplotlib Figure
    key: Hashable | None = None

    def __call__(self):
        return self.build()


@dataclass(frozen=True)
class ModelOption:
    source: str  # shown as "Source" with what was detected
    load: Callable[[], models.Checkpoint]


@dataclass(frozen=True)
class Context:
    """One run's page: the model in use and its options, the images with their quick analyses
    and crops, the one inspected (`pick`) with its class and analysis, the drawing."""

    ckpt: models.Checkpoint
    label: str
    models: dict[str, ModelOption]
    items: tuple[ImageItem, ...]
    base: tuple  # each image's analysis under a quick method: predictions, trace
    crops: tuple  # the network's crop of each image, at the original's resolution
    pick: int
    target: int | None  # None: the top-1 prediction
    analysis: Any  # the inspected image's analysis under the chosen method and class
    view: View
    errors: Any  # the container where problems are said
    kind: str = "classes"  # what the network returns (`viz.targets.output_kind`)
    explained: Any = None  # for the other kinds: `lens_app.explain.Explained`

    @property
    def classifier(self) -> bool:
        return self.kind == "classes"

    @property
    def explain(self) -> tuple[str, object]:
        """(key, target callable) of what a network that is not a classifier explains."""
        if self.explained is None or self.explained.target is None:
            return ("", None)
        return (self.explained.key, self.explained.target)

    @property
    def settings(self) -> viz.FigureSettings:
        return self.view.settings

    @property
    def item(self) -> ImageItem:
        return self.items[self.pick]

    @property
    def crop(self):
        return self.crops[self.pick]

    @property
    def stem(self) -> str:
        return viz.safe_stem(self.item.name)

    @property
    def cam_name(self) -> str:
        """The CAM method and its smoothing as file names give them (`gradcampp_aug`)."""
        return cam_file_name(self.settings)

    @property
    def stamp(self) -> str:
        return keys.image_model(self.item, self.ckpt)

    @property
    def transformer(self) -> bool:
        """A transformer has heads where a CNN has channel weights."""
        return any(rec.kind == "self-attention" for rec in self.analysis.trace)

    def draw(self, name: str, **extra) -> Drawing:
        """The builder of one of the image's figures under this run's settings, with its key."""
        an, crop, names, settings = self.analysis, self.crop, self.ckpt.class_names, self.settings
        key = None
        if not SlowRun.slow(settings.method, settings.smoothing):
            key = (name, self.item.sha, self.target, self.explain[0], *self.drawing_key(),
                   *sorted(extra.items()))  # fmt: skip
            try:
                hash(key)
            except TypeError:  # an option that is not a value (a trace): not kept
                key = None
        return Drawing(lambda: viz.draw_image_figure(name, crop, an, names, settings, **extra), key)

    def drawing_key(self) -> tuple:
        """What every figure of this run depends on besides its image, class and options: the
        model, its class names (a session may give its own) and the settings but the download
        dpi (the quick analyses are the same for every session: `st.cache_data`)."""
        s = self.settings
        names = viz.digest("\n".join(self.ckpt.class_names).encode())
        return (self.ckpt.sha256, names, s.method, s.layers, s.smoothing, s.num_samples, s.cmap,
                s.alpha, s.scale, s.width, s.render)  # fmt: skip


def cam_file_name(settings: viz.FigureSettings) -> str:
    """A method's name in download file names: `gradcam++` is `gradcampp` (a `+` is dropped by
    safe file names, and Grad-CAM++'s files must not take Grad-CAM's), with a noisy method's
    sample count (`sscam35`: another count gives other maps), then each smoothing."""
    name = settings.method.replace("++", "pp")
    if settings.num_samples is not None:
        name += str(settings.num_samples)
    return "_".join([name, *settings.smoothing])
