"""Data set: the report's numbers (`python -m viz report`) over a folder on the server, run in
a thread of its own with progress and a Stop, or a finished report opened."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

import viz

from .. import keys
from ..caching import policy
from ..context import USER_ERRORS, Context
from ..slow import Cancelled, SlowJob, SlowRun
from ..widgets import KEEP, state

REPORT_LABEL = "The data-set report"


def render(ctx: Context) -> None:
    if not ctx.classifier:
        st.info(
            f"The data-set report compares classifiers on classes; {viz.md_text(ctx.ckpt.label)} returns "
            f"{viz.targets.OUTPUT_KINDS[ctx.kind]} (the command line measures a data set for a segment or a concept: report --target …)."
        )
        return
    st.markdown(
        "Numbers over a folder of images on the server (`python -m viz report`): accuracy, "
        "deletion/insertion AUC, attention ↔ CAM agreement, the randomisation sanity check, "
        "with 95% bootstrap intervals. Run it here on the model in use, or open a report folder."
    )
    limits = policy()
    if not limits.server_paths:
        st.info("Server paths are turned off on this server (shared mode without allowed folders).")
        return
    reports: dict = state(keys.REPORTS, {})
    if reports.get("model") != ctx.ckpt.sha256:  # a report of the model in use only
        reports["current"], reports["model"] = None, ctx.ckpt.sha256
    run_col, open_col = st.columns(2)
    with run_col:
        run_form(ctx, reports, limits)
    with open_col:
        done_folder = st.text_input("A finished report folder", key="rep_open",
                                    persist_state=KEEP).strip()  # fmt: skip
        if st.button("Open", disabled=not done_folder, key="rep_open_go"):
            try:
                found = limits.check_path(done_folder, "folder")
                reports["current"], reports["stem"] = viz.open_report(found), found.name
            except USER_ERRORS as exc:
                ctx.errors.error(viz.md_text(f"{done_folder}: {exc}"))
    show_report(reports.get("current"), viz.safe_stem(reports.get("stem", "")))


def run_form(ctx: Context, reports: dict, limits) -> None:
    folder = st.text_input("Image folder (ImageFolder layout, or any images)", key="rep_images",
                           persist_state=KEEP).strip()  # fmt: skip
    labels = st.text_input(
        "Labels CSV (optional; columns file,label)", key="rep_labels", persist_state=KEEP,
        help="the class of each image, by file name (as samples/labels.csv); overrides the "
             "class folders of an ImageFolder; without labels and class folders there is "
             "no accuracy",
    ).strip()  # fmt: skip
    if folder and not labels:
        offer_labels_csv(folder, limits)
    deletion = st.selectbox("Deletion/insertion on", viz.DELETION_CHOICES, index=1, key="rep_del",
                            persist_state=KEEP, help="all maps, default (the last stage's CAM and "
                            "a random map) or off; each map costs 35 forwards per image")  # fmt: skip
    # each of the check's ~11 steps reruns the method: 2 images for the slow methods
    first = min(8, viz.default_sanity(ctx.settings.method))
    sanity = st.number_input("Sanity-check images", 0, 256, first, key=keys.report_sanity(first),
                             persist_state=KEEP)  # fmt: skip
    st.caption("It runs while this view is open: Stop, or another view, ends it.")
    if st.button("Run the report", disabled=not folder, key="rep_run"):
        try:
            options = viz.ReportOptions(method=ctx.settings.method, deletion=deletion,
                                        sanity=int(sanity))  # fmt: skip
            start_report(ctx, reports, limits, folder, labels, options)
        except (*USER_ERRORS, viz.UsageError) as exc:
            ctx.errors.error(viz.md_text(f"{folder}: {exc}"))
    follow_report(ctx, reports)


def start_report(ctx: Context, reports: dict, limits, folder: str, labels: str, options) -> None:
    """Check the inputs here (a bad path is said at once), then run the report in a job."""
    root = limits.check_path(folder, "folder")
    csv = str(limits.check_path(labels, "file")) if labels else None
    name = viz.safe_stem(ctx.ckpt.label.replace(".", " "))  # the model, not the file name
    inputs = viz.inputs_for([(name, ctx.label, ctx.ckpt)], root, labels=csv,
                            max_images=limits.max_stats_images)  # fmt: skip
    out = viz.temporary_report_folder(reports.get("folder"))
    reports["folder"], reports["current"] = out, None
    # downloads named by model and folder: a second report's files do not replace the first's
    reports["stem"] = f"{ctx.view.prefix}_{root.name}"
    stop_report()  # one report at a time

    def run(progress):
        rows = viz.run_report(inputs, out, options, progress=progress)
        viz.write_report(out, rows, inputs, options)
        return viz.open_report(out)

    st.session_state[keys.REPORT_JOB] = (SlowJob(run), folder, ctx.ckpt.sha256)


def follow_report(ctx: Context, reports: dict) -> None:
    """Wait on this session's report job, if one runs (also after a rerun), with its Stop."""
    found = st.session_state.get(keys.REPORT_JOB)
    if found is None:
        return
    job, folder, model = found
    if model != ctx.ckpt.sha256:  # another model in use: that report is not this one's
        stop_report()
        return
    try:
        SlowRun.follow(job, REPORT_LABEL, unit="images", on_stop=stopped_report)
    finally:
        SlowRun.done()
    st.session_state.pop(keys.REPORT_JOB, None)
    if isinstance(job.error, Cancelled) or job.cancelled:
        st.info(f"{REPORT_LABEL} stopped.")
    elif job.error is not None:
        if not isinstance(job.error, (*USER_ERRORS, viz.UsageError)):
            raise job.error
        ctx.errors.error(viz.md_text(f"{folder}: {job.error}"))
    else:
        reports["current"] = job.result


def stop_report() -> None:
    found = st.session_state.pop(keys.REPORT_JOB, None)
    if found is not None:
        found[0].cancelled = True


def stopped_report(label: str) -> None:
    """Stop's callback: the job is cancelled at its next progress report."""
    stop_report()
    st.session_state[keys.STOPPED] = f"{label} stopped."


def offer_labels_csv(folder: str, limits) -> None:
    """Say so when the image folder has a labels.csv (as samples/ has), where it may be read."""
    try:
        found = limits.check_path(str(Path(folder) / "labels.csv"), "file")
    except ValueError:  # none, or not to be read (shared mode: outside the allowed folders)
        return
    st.caption(f"{viz.md_text(found)} is there: give it as the labels CSV to use it.")


def show_report(report, stem: str) -> None:
    """The report's summary, figures and files; the files download as `{stem}_{name}`."""
    if report is None:
        return
    st.subheader("Summary")
    for title, rows in viz.readable_summary(report.summary).items():
        if rows:  # file text shown as data, never as Markdown
            st.caption(title)
            st.dataframe(pd.DataFrame(rows), hide_index=True)
    for name, image in report.figures.items():
        st.image(image, caption=name)
    if report.per_image:
        with st.expander("Per image"):
            st.dataframe(pd.DataFrame(report.per_image), hide_index=True)
    cols = st.columns(4)
    for i, (name, path) in enumerate(report.files.items()):
        cols[i % 4].download_button(
            name, data=path.read_bytes(), file_name=f"{stem}_{name}" if stem else name,
            key=keys.report_file(name),
            on_click="ignore", mime="text/html" if name.endswith(".html") else "text/plain",
        )  # fmt: skip
