"""`afina jobs watch`: follow a job until it ends, as a live view on a terminal and as plain
lines when piped (jobs.py registers the command)."""

import contextlib
import time
from collections.abc import Callable, Sequence
from functools import partial
from statistics import fmean
from typing import Any, NoReturn

import httpx
import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from afina.cli.http import (
    DEFAULT_BASE_URL,
    JOBS,
    ApiKey,
    BaseUrl,
    JobId,
    call,
    console,
    server,
    steps,
    when,
)

POLL_SECONDS = 1.0
FINAL = ("succeeded", "failed", "cancelled")
SHOWN_EVENTS = 8
BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], width: int = 60) -> str:
    """The series as block characters, one a column: a longer series is averaged into
    `width` buckets."""
    if len(values) > width:
        n = len(values)
        values = [fmean(values[i * n // width : (i + 1) * n // width]) for i in range(width)]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(BLOCKS[round((v - low) / span * (len(BLOCKS) - 1))] for v in values)


def _latest(points: list[dict[str, Any]], name: str) -> float | None:
    return next((p[name] for p in reversed(points) if p[name] is not None), None)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s"


def _view(job: dict[str, Any], points: list[dict[str, Any]], events: list[dict[str, Any]]) -> Group:
    """The live view of a job: progress, figures, loss curve, newest events."""
    progress = job["progress"]
    head = Text(f"{job['id']}  ", style="bold")
    head.append(job["status"], style="green" if job["status"] == "succeeded" else "cyan")
    head.append(f"  {job['fine_tuned_model'] or job['model']}")
    bar = Table.grid(padding=(0, 2))
    state = [ProgressBar(total=progress["total_steps"], completed=progress["steps_done"], width=40)]
    state.append(f"{steps(job)} steps")
    if progress["epoch"] is not None:
        state.append(f"epoch {progress['epoch']:.2f}")
    finish = progress["estimated_finish"]
    if finish is not None and job["status"] not in FINAL:
        state.append(f"ETA {when(finish, '%H:%M:%S')} (in {_duration(finish - time.time())})")
    bar.add_row(*state)
    figures = {
        "tokens/s": points[-1]["tokens_per_second"] if points else None,
        "loss": _latest(points, "loss"),
        "eval_loss": _latest(points, "eval_loss"),
    }
    shown = "   ".join(f"{k} {v:.4g}" for k, v in figures.items() if v is not None)
    parts: list[RenderableType] = [head, bar, shown or "no metrics yet"]
    losses = [p["loss"] for p in points if p["loss"] is not None]
    if losses:
        parts.append(f"loss {sparkline(losses)}  {max(losses):.4g} .. {min(losses):.4g}")
    if events:
        parts.append(Text("events, newest first", style="dim"))
    for event in events[:SHOWN_EVENTS]:
        style = {"warn": "yellow", "error": "red"}.get(event["level"], "")
        line = f"{when(event['created_at'], '%H:%M:%S')}  {event['message']}"
        parts.append(Text(line, style=style, no_wrap=True, overflow="ellipsis"))
    return Group(*parts)


def _metric_line(point: dict[str, Any], total: int | None) -> str:
    line = f"step {point['step']}/{total or '?'}"
    names = ("epoch", "loss", "eval_loss", "tokens_per_second")
    return line + "".join(f"  {n} {point[n]:.4g}" for n in names if point[n] is not None)


class _PlainLines:
    """`jobs watch` on no terminal: a line for each new event, metric step (again when a
    step is written again) and status, oldest first."""

    def __init__(self) -> None:
        self.printed: set[tuple[Any, ...]] = set()
        self.status: str | None = None

    def __call__(self, job: dict[str, Any], points: list, events: list) -> None:
        total = job["progress"]["total_steps"]
        new = [
            (e["created_at"], ("event", e["id"]), f"{when(e['created_at'])} {e['message']}")
            for e in reversed(events)
        ]
        new += [(p["at"], ("step", p["step"], p["at"]), _metric_line(p, total)) for p in points]
        for _, key, line in sorted(
            (n for n in new if n[1] not in self.printed), key=lambda n: n[0]
        ):
            self.printed.add(key)
            typer.echo(line)
        if job["status"] != self.status:
            self.status = job["status"]
            typer.echo(f"status {self.status}")


def _redraw(live: Live, job: dict[str, Any], points: list, events: list) -> None:
    live.update(_view(job, points, events), refresh=True)


def follow(client: httpx.Client, job_id: str) -> NoReturn:
    """Follow a job until it ends: exit 0 when it succeeded, 1 when it failed or was
    cancelled. A paused job is watched on."""
    screen = console()
    with contextlib.ExitStack() as stack:
        show: Callable[[dict[str, Any], list, list], None] = _PlainLines()
        if screen.is_terminal:
            live = stack.enter_context(Live(console=screen, auto_refresh=False))
            show = partial(_redraw, live)
        while True:
            job = call(client, "GET", f"{JOBS}/{job_id}")
            points = call(client, "GET", f"{JOBS}/{job_id}/metrics")["data"]
            events = call(client, "GET", f"{JOBS}/{job_id}/events", params={"limit": 100})
            show(job, points, events["data"])
            if job["status"] in FINAL:
                break
            time.sleep(POLL_SECONDS)
    if job["status"] == "succeeded":
        typer.echo(f"{job_id} succeeded: {job['fine_tuned_model']}")
        raise typer.Exit(0)
    error = job["error"]
    typer.echo(
        f"afina: {job_id} {job['status']}" + (f": {error['message']}" if error else ""), err=True
    )
    raise typer.Exit(1)


def watch_job(job_id: JobId, base_url: BaseUrl = DEFAULT_BASE_URL, api_key: ApiKey = None) -> None:
    """Follow a job live until it ends: progress, ETA, tokens/s, loss and its curve, events.
    Exit 0 when it succeeded, 1 when it failed or was cancelled. Piped: plain lines."""
    with server(base_url, api_key) as client:
        follow(client, job_id)
