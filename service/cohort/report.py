"""`report.html` of a cohort job: one self-contained page (inline SVG and CSS, no script, no CDN).

- the maximum grade since day 0 on each scale, side by side;
- ASTCT 2019 CRS against each older CRS scale, as cross-tables of maximum grades (seed 002,
  Table 2 compares the scales the same way);
- onset (day since infusion) and duration histograms of ASTCT CRS and ICANS;
- the patients with an indeterminate grade, with what was missing, and the warnings.
Every number is written; bars only repeat them.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from html import escape
from typing import Any

from ..core.astct import CRS_METHOD, ICANS_METHOD

GRADES = ("0", "1", "2", "3", "4", "indeterminate")
OLDER_CRS = ("lee2014-crs", "penn-crs", "mskcc-crs", "cartox-crs", "ctcae4-crs", "ctcae5-crs")
FILL = {"0": "#b2f2bb", "1": "#ffec99", "2": "#ffc078", "3": "#ff8787", "4": "#da77f2", "indeterminate": "#ced4da"}
CSS = """
body{font:15px/1.45 system-ui,sans-serif;color:#212529;margin:1.5rem auto;max-width:1200px;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.2rem;border-bottom:1px solid #ced4da;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 1rem .5rem 0;display:inline-table;vertical-align:top}
th,td{border:1px solid #ced4da;padding:.25rem .5rem;text-align:right}th{background:#f1f3f5}
caption{text-align:left;font-weight:600;padding:.25rem 0}.grid{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0}figcaption{font-weight:600}td.l,th.l{text-align:left}.muted{color:#495057}
"""


def _bars(title: str, counts: list[tuple[str, int]], fills: dict[str, str] | None = None) -> str:
    """A bar chart as inline SVG, each bar's count written above it and its label below."""
    width, height, bar = 40 * max(len(counts), 1) + 20, 150, 28
    top = max((n for _, n in counts), default=0) or 1
    parts = [f'<svg role="img" aria-label="{escape(title)}" width="{width}" height="{height + 40}">']
    for i, (label, n) in enumerate(counts):
        h = round(height * n / top)
        x = 10 + i * 40
        fill = (fills or {}).get(label, "#74c0fc")
        parts.append(f'<rect x="{x}" y="{height - h + 15}" width="{bar}" height="{h}" fill="{fill}" stroke="#495057"/>')
        parts.append(f'<text x="{x + bar / 2}" y="{height - h + 11}" text-anchor="middle" font-size="12">{n}</text>')
        short = "?" if label == "indeterminate" else escape(label)
        parts.append(f'<text x="{x + bar / 2}" y="{height + 30}" text-anchor="middle" font-size="12">{short}</text>')
    parts.append("</svg>")
    return f"<figure><figcaption>{escape(title)}</figcaption>{''.join(parts)}</figure>"


def _row(*values: object, cell: str = "td") -> str:
    """A table row; text cells left-aligned, numbers right-aligned."""
    tds = []
    for v in values:
        number = isinstance(v, int | float)
        text = f"{v:g}" if isinstance(v, float) else str(v)
        tds.append(f"<{cell}{'' if number else ' class=l'}>{escape(text)}</{cell}>")
    return f"<tr>{''.join(tds)}</tr>"


def _max_by(courses: list[dict[str, Any]], method: str) -> dict[str, str]:
    return {r["patient"]: r["max_grade"] for r in courses if r["method"] == method}


def _cross(courses: list[dict[str, Any]], older: str) -> str:
    astct, other = _max_by(courses, CRS_METHOD), _max_by(courses, older)
    cells = Counter((astct[p], other[p]) for p in astct if p in other)
    head = "".join(f"<th>{g if g != 'indeterminate' else '?'}</th>" for g in GRADES)
    rows = "".join(
        f"<tr><th>{a if a != 'indeterminate' else '?'}</th>"
        + "".join(f"<td>{cells[(a, b)] or ''}</td>" for b in GRADES)
        + "</tr>"
        for a in GRADES
    )
    caption = f"ASTCT CRS (rows) against {escape(older)} (columns); ? = indeterminate"
    return f"<table><caption>{caption}</caption><tr><th></th>{head}</tr>{rows}</table>"


def _onset_days(courses: list[dict[str, Any]], method: str) -> list[tuple[str, int]]:
    days: Counter[int] = Counter()
    for r in courses:
        if r["method"] == method and r["onset"] and r["day0"]:
            days[(datetime.fromisoformat(r["onset"]) - datetime.fromisoformat(r["day0"])).days] += 1
    return [(str(d), days[d]) for d in range(min(days, default=0), max(days, default=-1) + 1)]


def _durations(courses: list[dict[str, Any]], method: str) -> list[tuple[str, int]]:
    bins: Counter[int] = Counter()
    for r in courses:
        if r["method"] == method and r["duration_hours"] is not None:
            bins[int(r["duration_hours"] // 24)] += 1
    return [(f"{d}-{d + 1}", bins[d]) for d in range(0, max(bins, default=-1) + 1)]


def render_report(
    courses: list[dict[str, Any]],
    registry: list[dict[str, Any]],
    warnings: list[dict[str, Any]],
    patients: int,
    resources: int,
    now: datetime,
) -> str:
    order = {m: i for i, m in enumerate((CRS_METHOD, ICANS_METHOD, *OLDER_CRS))}  # ASTCT first, as the app
    methods = sorted(dict.fromkeys(r["method"] for r in courses), key=lambda m: (order.get(m, len(order)), m))
    dist = "".join(
        _bars(
            m,
            [
                (g, n)
                for g, n in ((g, sum(1 for r in courses if r["method"] == m and r["max_grade"] == g)) for g in GRADES)
            ],
            FILL,
        )
        for m in methods
    )
    cross = "".join(_cross(courses, m) for m in OLDER_CRS if m in methods)
    onset = "".join(
        _bars(f"{name}: onset, day since infusion", _onset_days(courses, m))
        for m, name in ((CRS_METHOD, "ASTCT CRS"), (ICANS_METHOD, "ASTCT ICANS"))
    )
    duration = "".join(
        _bars(f"{name}: duration, days", _durations(courses, m))
        for m, name in ((CRS_METHOD, "ASTCT CRS"), (ICANS_METHOD, "ASTCT ICANS"))
    )
    indeterminate = [r for r in courses if "indeterminate" in (r["max_grade"], r["current_grade"])]
    ind_rows = "".join(
        _row(
            r["patient"],
            r["method"],
            "?" if r["max_grade_at_least"] is None else f"at least {r['max_grade_at_least']}",
            r["current_grade"],
            r["missing_now"] or "-",
            r["indeterminate_hours"],
        )
        for r in indeterminate
    )
    reasons = Counter(str(w["reason"]).split(":")[0].split("(")[0].strip() for w in warnings)
    warn_rows = "".join(_row(k, n) for k, n in reasons.most_common())
    crs_yes = sum(1 for r in registry if r["crs"] == "yes")
    icans_yes = sum(1 for r in registry if r["icans"] == "yes")
    ind_head = _row("patient", "scale", "maximum", "now", "missing now", "hours not graded", cell="th")
    none = "<tr><td class=l>none</td></tr>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>iectox cohort report</title><style>{CSS}</style></head><body>
<h1>Cohort report: CRS and ICANS over the whole course</h1>
<p>{patients} patients graded from {resources} resources on {len(methods)} scales; CRS (ASTCT 2019) in
{crs_yes}, ICANS in {icans_yes}. Generated {escape(now.isoformat(timespec="seconds"))} by iectox, with the same
grading as <code>$evaluate</code>. {len(warnings)} warnings (warnings.csv). An indeterminate grade means data were
missing: it is never counted as grade 0.</p>
<h2>Maximum grade since day 0, per scale</h2><div class="grid">{dist}</div>
<h2>ASTCT 2019 CRS against the older CRS scales</h2><p class="muted">Maximum grade since day 0 of each patient on both
scales: the diagonal agrees.</p>{cross}
<h2>Onset</h2><div class="grid">{onset}</div>
<h2>Duration (onset to resolution)</h2><div class="grid">{duration}</div>
<h2>Patients with an indeterminate grade</h2><table>{ind_head}{ind_rows or none}</table>
<h2>Warnings</h2><table>{_row("kind", "count", cell="th")}{warn_rows or none}</table>
</body></html>
"""
