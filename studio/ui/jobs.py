"""The Jobs tab: the training queue with states, progress and errors; pause, resume (also of a
failed or cancelled job: it continues from its last checkpoint), cancel, remove."""

from __future__ import annotations

import time
from typing import Any

from studio.errors import StudioError
from studio.ui.common import UIContext, on

COLUMNS = ["id", "state", "method", "name", "trigger", "progress", "loss", "eta_s", "base", "error"]


# -- handlers -------------------------------------------------------------------------------------
def job_rows(ctx: UIContext) -> list[list[Any]]:
    """The queue as table rows (running first, then queued by priority, then the rest)."""
    return [[r[k] for k in COLUMNS] for r in (j.row() for j in ctx.studio.jobs.list())]


def job_log(ctx: UIContext, job_id: int | None, limit: int = 200) -> str:
    if not job_id:
        return ""
    events = ctx.studio.jobs.events(int(job_id))
    lines = [time.strftime("%H:%M:%S ", time.localtime(e.time)) + e.text() for e in events if e.kind != "progress"]
    progress = [e for e in events if e.kind == "progress"]
    if progress:
        lines.append(f"(last progress) {progress[-1].text()}")
    return "\n".join(lines[-limit:])


def act(ctx: UIContext, action: str, job_id: int | None) -> str:
    """``pause`` / ``resume`` / ``cancel`` / ``remove`` a job; returns a one-line result."""
    if not job_id:
        raise StudioError("Select a job first (click its row, or type its id).")
    queue = ctx.studio.jobs
    jid = int(job_id)
    if action == "remove":
        queue.remove(jid)
        return f"Job {jid} removed."
    job = {"pause": queue.pause, "resume": queue.resume, "cancel": queue.cancel}[action](jid)
    return f"Job {job.id}: {job.state}" + (f" ({job.request} requested)" if job.request else "")


# -- layout ---------------------------------------------------------------------------------------
def build(tab: Any, ctx: UIContext) -> dict[str, Any]:
    import gradio as gr

    c: dict[str, Any] = {}
    with tab:
        gr.Markdown("Training jobs run one at a time per device, in the background; they survive a restart of the "
                    "app and continue from their last checkpoint. A failed job can be resumed after fixing its cause.")
        table = gr.Dataframe(value=job_rows(ctx), headers=COLUMNS, interactive=False, wrap=True, elem_id="jobs-table")
        with gr.Row():
            c["job"] = gr.Number(label="Job id", precision=0, value=None, elem_id="jobs-id")
            buttons = {a: gr.Button(a.capitalize(), variant="stop" if a in ("cancel", "remove") else "secondary")
                       for a in ("pause", "resume", "cancel", "remove")}
            refresh = gr.Button("Refresh")
        result = gr.Markdown("")
        log = gr.Textbox(label="Events", lines=10, max_lines=20, elem_id="jobs-log")
        timer = gr.Timer(2.0)

    def select(evt: Any) -> Any:
        row = getattr(evt, "row_value", None)
        return int(row[0]) if row else gr.skip()

    select.__annotations__["evt"] = gr.SelectData  # gradio passes the event data by this annotation

    table.select(select, None, c["job"])
    on(timer.tick, ctx, lambda ctx_, form: job_rows(ctx_), {}, table)
    on(refresh.click, ctx, lambda ctx_, form: [job_rows(ctx_), job_log(ctx_, form["job"])], {"job": c["job"]},
       [table, log])
    on(c["job"].change, ctx, lambda ctx_, form: job_log(ctx_, form["job"]), {"job": c["job"]}, log)
    for action, button in buttons.items():
        on(button.click, ctx, lambda ctx_, form, action=action: [act(ctx_, action, form["job"]), job_rows(ctx_),
                                                                 job_log(ctx_, form["job"])],
           {"job": c["job"]}, [result, table, log])
    on(tab.select, ctx, lambda ctx_, form: job_rows(ctx_), {}, table)
    return c
