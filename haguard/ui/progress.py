"""Live migration progress for operators: a rich progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from haguard.migration.result import MigrationResult
from haguard.migration.result import Progress as MigProgress


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class _Figures(ProgressColumn):
    def render(self, task: Task) -> Text:
        p: MigProgress | None = task.fields.get("p")
        if p is None:
            return Text("")
        eta = p.eta_s
        parts = [
            f"{human_bytes(p.transferred_bytes)} sent",
            f"{human_bytes(p.remaining_bytes)} left",
            f"dirty {human_bytes(p.dirty_rate_bps)}/s",
            f"{human_bytes(p.throughput_bps)}/s",
            f"pass {p.passes}",
            f"ETA {eta:.0f}s" if eta is not None else "ETA -",
        ]
        return Text("  ".join(parts), style="cyan")


class MigrationDisplay:
    """Context manager; feed it `update(progress)`; it draws a bar or prints step changes."""

    def __init__(self, label: str, *, console: Console | None = None, enabled: bool = True) -> None:
        self.console = console or Console(stderr=True)
        self.label = label
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self._bar: Progress | None = None
        self._task = TaskID(0)
        self._last_step = ""

    def __enter__(self) -> MigrationDisplay:
        if self.live:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 TextColumn("{task.percentage:>5.1f}%"), _Figures(),
                                 console=self.console, transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=100.0)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar:
            self._bar.stop()

    def update(self, p: MigProgress) -> None:
        if not self.enabled:
            return
        if self._bar:
            self._bar.update(self._task, completed=p.percent, p=p,
                             description=f"{self.label} [{p.step or p.status}]")
        elif p.step != self._last_step:
            self.console.print(f"{self.label}: {p.step} ({p.percent:.0f}%, pass {p.passes}, "
                               f"{human_bytes(p.transferred_bytes)} sent)", highlight=False)
        self._last_step = p.step

    def alert(self, kind: str, message: str) -> None:
        self.console.print(f"[bold yellow]ALERT[/] {kind}: {message}")


STEP_NAMES = {"SetDowntimeLimit": "downtime↑", "StartThrottling": "throttle",
              "StartPostcopy": "postcopy", "Abort": "abort", "PausePostcopy": "pause",
              "RecoverPostcopy": "recover", "RaiseAlert": "alert", "GiveUpRecovery": "gave up"}


def result_table(results: list[tuple[str, MigrationResult]], title: str = "Migrations") -> Table:
    t = Table(title=title)
    for col in ("move", "status", "total", "downtime", "sent", "passes", "postcopy", "steps"):
        t.add_column(col)
    for label, r in results:
        t.add_row(label, r.status if r.ok else f"[red]{r.status}[/]",
                  f"{r.total_time_ms / 1000:.1f} s",
                  f"{r.downtime_ms} ms" if r.downtime_ms is not None else "-",
                  human_bytes(r.transferred_bytes), str(r.passes), "yes" if r.postcopy else "no",
                  ", ".join(STEP_NAMES.get(s["action"], s["action"]) for s in r.steps) or "-")
    return t


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()
