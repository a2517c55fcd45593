"""Who may do what: the app's deployment model, as a policy object (no streamlit here).

By default the app runs for one person on their own machine (`local`): server paths are theirs
to type. `ATTENTION_LENS_SERVE=shared` turns it into a lab server used by many browsers:

- no server-path boxes, unless the operator lists allowed folders in
  `ATTENTION_LENS_ALLOWED_ROOTS` (separated by `:`); a typed path is resolved (symlinks
  included) and must stay inside one of them, and a refusal never says whether a path outside
  exists;
- per-session limits on uploads (how many, bytes, pixels) and on work (images per
  class-statistics run, seconds per run);
- less memory for the images kept for reloaded pages, for a shorter time.

In both modes only regular files are read (no FIFO, device or /proc file), directory walks skip
symbolic links and are bounded, so no path can hang or exhaust the server.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SERVE_ENV", "ROOTS_ENV", "PathRefused", "ServePolicy", "serve_policy"]

SERVE_ENV = "ATTENTION_LENS_SERVE"
ROOTS_ENV = "ATTENTION_LENS_ALLOWED_ROOTS"
MODES = ("local", "shared")


class PathRefused(ValueError):
    """A server path the policy does not allow; one line that reveals nothing outside the roots."""


@dataclass(frozen=True)
class ServePolicy:
    """Limits and permissions of one app deployment.

    Attributes:
        mode: "local" (one user, their machine) or "shared" (a lab server).
        allowed_roots: resolved folders whose files may be named by path (shared mode).
        max_images: images one session may upload or pick at a time.
        max_image_bytes: bytes per uploaded image.
        max_pixels: pixels per image (checked on the header, before decoding).
        max_stats_images: images one class-statistics run may read.
        max_stats_seconds: wall time of one class-statistics run (None: unlimited).
        kept_upload_bytes: uploaded images kept on the server for pages that are reloaded,
            all sessions together (`viz.interactive.KeptUploads`); 0: none kept.
        kept_upload_seconds: how long they are kept after their last use.
        warning: a one-line note about the configuration (e.g. an unknown mode), or "".
    """

    mode: str = "local"
    allowed_roots: tuple[Path, ...] = ()
    max_images: int = 200
    max_image_bytes: int = 100 * 2**20
    max_pixels: int = 40_000_000
    max_stats_images: int = 20_000
    max_stats_seconds: float | None = None
    kept_upload_bytes: int = 1024 * 2**20
    kept_upload_seconds: float = 4 * 3600.0
    warning: str = ""

    @property
    def shared(self) -> bool:
        return self.mode == "shared"

    @property
    def server_paths(self) -> bool:
        """Whether the app offers boxes for paths on the server."""
        return not self.shared or bool(self.allowed_roots)

    def check_path(self, text: str, want: str = "file") -> Path:
        """Resolve a typed server path and check it may be read as a `want` ("file" or "folder").

        Raises:
            PathRefused: not allowed, missing, or not a regular file / folder (one line).
        """
        if want not in ("file", "folder"):
            raise ValueError(f"want must be 'file' or 'folder', got {want!r}")
        text = text.strip()
        if not text or "\x00" in text:
            raise PathRefused("give a path")
        if self.shared:
            if not self.allowed_roots:
                raise PathRefused("server paths are turned off on this server")
            path = Path(os.path.realpath(text))
            if not any(path == root or root in path.parents for root in self.allowed_roots):
                # the same words whether or not the path exists: no existence oracle
                raise PathRefused(f"{text!r} is not inside the folders this server allows")
        else:
            path = Path(os.path.realpath(Path(text).expanduser()))
        try:
            info = path.stat()
        except OSError:
            raise PathRefused(f"no such {want}: {text!r}") from None
        if want == "folder":
            if not stat.S_ISDIR(info.st_mode):
                raise PathRefused(f"{text!r} is not a folder")
        elif not stat.S_ISREG(info.st_mode):
            raise PathRefused(f"{text!r} is not a regular file")
        return path


def serve_policy(environ: dict[str, str] | None = None) -> ServePolicy:
    """The policy the environment asks for (`ATTENTION_LENS_SERVE`, `..._ALLOWED_ROOTS`)."""
    env = os.environ if environ is None else environ
    mode = env.get(SERVE_ENV, "local").strip().lower() or "local"
    warning = ""
    if mode not in MODES:
        warning = f"unknown {SERVE_ENV} {mode[:40]!r} (expected local or shared): running as shared"
        mode = "shared"
    if mode == "local":
        return ServePolicy(warning=warning)
    roots = []
    for part in env.get(ROOTS_ENV, "").split(os.pathsep):
        if part.strip():
            root = Path(os.path.realpath(part.strip()))
            if root.is_dir():
                roots.append(root)
    return ServePolicy(
        mode="shared",
        allowed_roots=tuple(roots),
        max_images=16,
        max_image_bytes=20 * 2**20,
        max_pixels=16_000_000,
        max_stats_images=2_000,
        max_stats_seconds=120.0,
        kept_upload_bytes=256 * 2**20,
        kept_upload_seconds=3600.0,
        warning=warning,
    )
