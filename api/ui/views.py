"""What the console's templates show: the Jinja2 environment, number and time formats, a job's row, and an adapter's
lineage drawn as inline SVG."""

from __future__ import annotations

import html
from datetime import datetime, timezone
from pathlib import Path

from fastapi.templating import Jinja2Templates

from farm.console import Lineage, LineageNode
from farm.schemas import JobPublic

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=str(HERE / "templates"))


def fmt_num(value, digits: int = 4) -> str:
    """A float with `digits` significant digits, an int as is, '-' for nothing."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def fmt_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def fmt_age(when: datetime | None, now: datetime | None = None) -> str:
    """How long ago: 42s, 5m, 3h, 2d."""
    if when is None:
        return "-"
    now = now or datetime.now(timezone.utc)
    seconds = max(0, int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def fmt_time(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC") if when else "-"


templates.env.filters.update(num=fmt_num, size=fmt_size, age=fmt_age, time=fmt_time)


def job_row(job: JobPublic) -> dict:
    """The figures of a job's row in the jobs table (the live stream sends rows rendered from the same dict)."""
    p = job.progress or {}
    step, total = p.get("step"), p.get("total_steps")
    percent = None
    if isinstance(step, (int, float)) and isinstance(total, (int, float)) and total:
        percent = max(0, min(100, round(100 * step / total)))
    if job.state == "succeeded":
        percent = 100
    loss = p.get("final_loss", p.get("loss"))
    return {
        "id": job.id, "short": job.id[:12], "state": job.state, "kind": job.kind, "name": job.name,
        "step": step, "total": total, "percent": percent,
        "loss": fmt_num(loss), "eval_loss": fmt_num(p.get("eval_loss")),
        "tokens_per_s": fmt_num(p.get("tokens_per_s"), 3) if p.get("tokens_per_s") else "-",
        "worker": (job.worker or "-").split("/pid", 1)[0], "submitter": job.submitted_by or "-",
        "age": fmt_age(job.created_at), "adapter": job.adapter,
    }


# ---------------------------------------------------------------- lineage picture

_BOX_W, _BOX_H, _GAP_X, _GAP_Y = 170, 34, 40, 14
_COLORS = {"self": "#1f6feb", "parent": "#6e7781", "child": "#2da44e", "replay": "#bf8700", "co-trained": "#8250df"}


def _box(node: LineageNode, x: int, y: int) -> str:
    label = html.escape(f"{node.name}:v{node.version}")
    href = html.escape(f"/ui/adapters/{node.name}/{node.version}", quote=True)
    color = _COLORS.get(node.relation, "#6e7781")
    return (f'<a href="{href}"><g class="lineage-node" data-relation="{node.relation}">'
            f'<rect x="{x}" y="{y}" width="{_BOX_W}" height="{_BOX_H}" rx="6" fill="#fff" stroke="{color}" '
            f'stroke-width="{3 if node.relation == "self" else 1.5}"/>'
            f'<text x="{x + _BOX_W // 2}" y="{y + 15}" text-anchor="middle" font-size="12">{label}</text>'
            f'<text x="{x + _BOX_W // 2}" y="{y + 28}" text-anchor="middle" font-size="10" fill="{color}">'
            f'{html.escape(node.relation)}</text></g></a>')


def _arrow(x1: int, y1: int, x2: int, y2: int, dashed: bool = False) -> str:
    dash = ' stroke-dasharray="4 3"' if dashed else ""
    return (f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="#8c959f" stroke-width="1.5"{dash} '
            f'marker-end="url(#arrow)"/>')


def lineage_svg(lineage: Lineage) -> str:
    """Ancestors left of the adapter (oldest first), children right, replays and co-trained adapters below it:
    every box links to that adapter's page."""
    parents = list(reversed(lineage.parents))
    columns = len(parents) + 1 + (1 if lineage.children else 0)
    side = lineage.replays + lineage.cotrained
    rows = max(1, len(lineage.children), 1 + len(side))
    width = columns * _BOX_W + (columns - 1) * _GAP_X + 20
    height = rows * (_BOX_H + _GAP_Y) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="lineage" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="lineage">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#8c959f"/></marker></defs>']
    y0 = 10
    x = 10
    for node in parents:
        parts.append(_box(node, x, y0))
        parts.append(_arrow(x + _BOX_W, y0 + _BOX_H // 2, x + _BOX_W + _GAP_X, y0 + _BOX_H // 2))
        x += _BOX_W + _GAP_X
    self_x = x
    parts.append(_box(lineage.node, self_x, y0))
    for i, node in enumerate(side, start=1):
        y = y0 + i * (_BOX_H + _GAP_Y)
        parts.append(_box(node, self_x, y))
        parts.append(_arrow(self_x + 12, y0 + _BOX_H, self_x + 12, y, dashed=True))
    if lineage.children:
        cx = self_x + _BOX_W + _GAP_X
        for i, node in enumerate(lineage.children):
            y = y0 + i * (_BOX_H + _GAP_Y)
            parts.append(_arrow(self_x + _BOX_W, y0 + _BOX_H // 2, cx, y + _BOX_H // 2))
            parts.append(_box(node, cx, y))
    parts.append("</svg>")
    return "".join(parts)
