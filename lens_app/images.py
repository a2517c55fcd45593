"""The sidebar's images: uploads (kept for a reload of the page) or the bundled samples."""

from __future__ import annotations

import io
from pathlib import Path

import streamlit as st

import viz

from . import keys
from .caching import kept_uploads, policy
from .context import ImageItem

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
DEFAULT_SAMPLE = "english_springer_4972.jpg"


def choose_images(errors) -> list[ImageItem]:
    st.sidebar.header("Images")
    limits = policy()
    uploads = st.sidebar.file_uploader(
        "Upload images", type=list(viz.IMAGE_TYPES), accept_multiple_files=True, key="images",
        max_upload_size=max(1, limits.max_image_bytes // 2**20),
    )  # fmt: skip
    uploads = list(uploads or [])
    if len(uploads) > limits.max_images:
        errors.warning(
            f"{len(uploads)} images uploaded; this server analyses the first {limits.max_images}"
        )
        uploads = uploads[: limits.max_images]
    sources: list[tuple[str, bytes]] = []
    for f in uploads:
        if f.size > limits.max_image_bytes:
            errors.error(
                viz.md_text(f"{f.name}: {f.size / 2**20:.1f} MB, over the "
                            f"{limits.max_image_bytes / 2**20:.0f} MB limit per image")
            )  # fmt: skip
            continue
        sources.append((f.name, f.getvalue()))
    sources = ReloadedImages(limits).follow(bool(uploads), sources, errors)
    items = decoded(sources, limits, errors)
    if not items:  # nothing uploaded, or nothing that could be read: the samples stay at hand
        samples = {s.path.name: s for s in viz.sample_images(SAMPLES)}
        default = [DEFAULT_SAMPLE] if DEFAULT_SAMPLE in samples and not sources else []
        picked = st.sidebar.multiselect(
            "Sample images", list(samples), default=default, key="samples"
        )
        items = decoded([(n, samples[n].path.read_bytes()) for n in picked], limits, errors)
    return items


class ReloadedImages:
    """Uploaded images survive a reload of the page (which starts a new session, its upload box
    empty): kept on the server (`KeptUploads`, bounded by the serve policy) under a random key
    that the page's address carries (`?images=…`) and, where the browser has Streamlit's XSRF
    cookie, that browser only. Removing the uploads from the box, or "Forget them", drops them.

    Per session, `st.session_state[keys.RELOAD_IMAGES]`: "uploaded:<digest>" (kept), "restored"
    (shown from the store after a reload), "none"; absent in a new session.
    """

    PARAM, STATE = "images", keys.RELOAD_IMAGES

    def __init__(self, limits: viz.ServePolicy) -> None:
        self.store = kept_uploads(limits.kept_upload_bytes, limits.kept_upload_seconds)
        self.on = limits.kept_upload_bytes > 0

    def _key(self, token: str) -> str:
        return f"{token}:{viz.digest(self._browser().encode())}"

    @staticmethod
    def _browser() -> str:
        """This browser's secret: the token of Streamlit's XSRF cookie, unmasked (the cookie is
        "2|mask|masked token|time", masked anew at each page load); "" without the cookie."""
        cookie = (st.context.cookies or {}).get("_streamlit_xsrf", "")
        try:
            version, mask, masked, _ = cookie.split("|")
            mask_bytes, token = bytes.fromhex(mask), bytes.fromhex(masked)
        except ValueError:
            return cookie
        if version != "2" or len(mask_bytes) != 4:
            return cookie
        return bytes(b ^ mask_bytes[i % 4] for i, b in enumerate(token)).hex()

    def follow(self, uploaded: bool, sources: list[tuple[str, bytes]], errors) -> list:
        """The images to analyse: this run's uploads (kept for a reload), else those kept
        before the page was reloaded."""
        if not self.on:
            return sources
        token, was = st.query_params.get(self.PARAM), st.session_state.get(self.STATE)
        if uploaded:
            stamp = "uploaded:" + viz.digest(b"".join(viz.digest(d).encode() for _, d in sources))
            if was != stamp:
                token = token or viz.KeptUploads.new_key()
                st.query_params[self.PARAM] = token
                if not self.store.put(self._key(token), sources):
                    errors.info("These images are too large to keep for a reload of the page.")
                st.session_state[self.STATE] = stamp
            return sources
        restored = self.store.get(self._key(token)) if token and was in (None, "restored") else []
        if not restored:  # removed from the box, forgotten, expired, or another address
            self.forget(token)
            return []
        st.session_state[self.STATE] = "restored"
        st.sidebar.caption(f"{len(restored)} image(s) kept from before the page was reloaded.")
        st.sidebar.button("Forget them", key="forget_images", on_click=self.forget, args=(token,),
                          icon=":material/delete:")  # fmt: skip
        return restored

    def forget(self, token: str | None) -> None:
        if token:
            self.store.drop(self._key(token))
            st.query_params.pop(self.PARAM, None)
        if self.STATE in st.session_state:
            st.session_state[self.STATE] = "none"


def decoded(sources: list[tuple[str, bytes]], limits, errors) -> list[ImageItem]:
    """The images that decode (allow-listed formats, pixel limit), a file uploaded twice (same
    name and bytes) once; one error line for each that does not decode."""
    items, seen = [], set()
    for name, data in sources:
        sha = viz.digest(data)
        if (name, sha) in seen:
            continue
        seen.add((name, sha))
        try:
            image = viz.load_image(_named(data, name), max_pixels=limits.max_pixels)
            items.append(ImageItem(name, data, sha, image))
        except viz.ImageError as exc:
            errors.error(viz.md_text(exc))
    return items


def _named(data: bytes, name: str) -> io.BytesIO:
    """The bytes as a file object that carries the name (so an ImageError names the file)."""
    fh = io.BytesIO(data)
    fh.name = name
    return fh
