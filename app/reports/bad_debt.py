"""``dunning report bad-debt --since DATE``: bad-debt entries and exits per day, by why and product.

From bad_debt_episode rows: an entry counts on the day the episode opened (why = its reason, with
the failure class), an exit on the day it closed (why = how it left, with the mean days spent).
An episode covering several products counts once per product, so a rise in one product (say, the
premium upgrades that failed) stands out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

from sqlalchemy import Connection

REPORT_SQL = """
WITH episodes AS (
  SELECT e.*, COALESCE(NULLIF(p.product, ''), '-') AS product
    FROM bad_debt_episode e
    LEFT JOIN LATERAL jsonb_array_elements_text(CASE WHEN jsonb_typeof(e.products) = 'array'
                                                     THEN e.products ELSE '[]'::jsonb END) AS p(product) ON true
)
SELECT (entered_at AT TIME ZONE 'UTC')::date AS day, 'entry' AS event, reason AS why,
       COALESCE(failure_class, '-') AS failure_class, product, count(*) AS n, NULL::float AS mean_days
  FROM episodes WHERE entered_at >= %(since)s AND (%(until)s::timestamptz IS NULL OR entered_at < %(until)s)
 GROUP BY 1, 2, 3, 4, 5
UNION ALL
SELECT (exited_at AT TIME ZONE 'UTC')::date, 'exit', COALESCE(exit_how, '-'), COALESCE(failure_class, '-'), product,
       count(*), avg(duration_seconds) / 86400.0
  FROM episodes WHERE exited_at IS NOT NULL AND exited_at >= %(since)s
   AND (%(until)s::timestamptz IS NULL OR exited_at < %(until)s)
 GROUP BY 1, 2, 3, 4, 5
ORDER BY 1, 2, 6 DESC, 3, 5
"""


@dataclass(frozen=True)
class Line:
    day: date
    event: str  # entry | exit
    why: str  # the entry's reason, or how it exited
    failure_class: str
    product: str
    count: int
    mean_days: float | None


class BadDate(ValueError):
    pass


def parse_day(raw: str, name: str = "--since") -> datetime:
    try:
        return datetime.strptime(raw, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise BadDate(f"{name} must be a date like 2026-11-01, got {raw!r}") from None


def lines(conn: Connection, since: datetime, until: datetime | None = None) -> list[Line]:
    rows = conn.exec_driver_sql(REPORT_SQL, {"since": since, "until": until}).all()
    return [Line(r[0], r[1], r[2], r[3], r[4], int(r[5]), float(r[6]) if r[6] is not None else None) for r in rows]


HEADER = ("day", "event", "why", "failure class", "product", "count", "mean days")


def render(report: list[Line], since: datetime) -> str:
    if not report:
        return f"no bad-debt entries or exits since {since.date().isoformat()}\n"
    cells = [HEADER] + [
        (ln.day.isoformat(), ln.event, ln.why, ln.failure_class, ln.product, str(ln.count),
         f"{ln.mean_days:.1f}" if ln.mean_days is not None else "")
        for ln in report
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]
    out = []
    for n, row in enumerate(cells):
        padded = [c.rjust(w) if i >= 5 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        out.append("  ".join(padded).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    entries = sum(ln.count for ln in report if ln.event == "entry")
    exits = sum(ln.count for ln in report if ln.event == "exit")
    out.append("")
    out.append(f"total: {entries} entries, {exits} exits (counted per product)")
    return "\n".join(out) + "\n"
