"""Paper tables from run directories: our numbers beside the paper's, never invented.

A table config (``conf/table/<name>.yaml``) lists rows (an experiment plus the overrides that
identify its run) and columns (metric keys). Each row's run directory is found the way the CLI
computes it (``xmodal.config.compose``), its ``metrics.json`` is read, and the table is rendered as
markdown, LaTeX and CSV. A row without a finished run is marked missing; a cell the run did not
report stays empty; paper numbers come only from the config. A row with ``prefix`` reads every
column key with its first segment (``test``) replaced by the prefix, so one run that reports several
methods (uCLIP's ``compare``: ``test/<method>/<d>/S``) fills several rows; a column marked
``shared: true`` (a property of the run, e.g. the R@K of its ranking) is read unprefixed.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from xmodal.config import compose
from xmodal.runs import is_finished, read_metrics

MISSING_MARK = "—"


@dataclass
class TableRow:
    label: str
    run_dir: str
    ours: dict[str, float | None]
    paper: dict[str, float | None] = field(default_factory=dict)
    finished: bool = False


def metric_key(key: str, prefix: str | None = None) -> str:
    """The metrics.json key a row reads for column ``key``: ``prefix`` replaces its first segment
    (``metric_key("test/t2i/S", "test/total")`` is ``test/total/t2i/S``)."""
    if not prefix:
        return key
    return f"{prefix}/{key.split('/', 1)[1]}" if "/" in key else key


def collect(table: DictConfig, extra_overrides: Sequence[str] = ()) -> list[TableRow]:
    """Read every row's metrics.json; rows whose run is missing keep empty cells."""
    rows = []
    for row in table.rows:
        overrides = [f"experiment={row.experiment}", *row.get("overrides", []), *extra_overrides]
        run_dir = compose(row.get("task", table.task), overrides).run_dir
        finished = is_finished(run_dir)
        metrics = read_metrics(run_dir) if finished else {}
        scale = float(table.get("scale", 1.0))
        prefix = row.get("prefix")
        found = {
            c.key: metrics.get(c.key if c.get("shared") else metric_key(c.key, prefix))
            for c in table.columns
        }
        ours = {k: (None if v is None else float(v) * scale) for k, v in found.items()}
        paper = {k: (None if v is None else float(v)) for k, v in (row.get("paper") or {}).items()}
        rows.append(TableRow(row.label, run_dir, ours, paper, finished))
    return rows


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _cells(table: DictConfig, row: TableRow) -> list[tuple[str, str, str]]:
    """Per column: (ours, paper, ours - paper) as strings; empty where unknown."""
    digits = int(table.get("digits", 2))
    out = []
    for col in table.columns:
        ours, paper = row.ours.get(col.key), row.paper.get(col.key)
        diff = None if ours is None or paper is None else ours - paper
        out.append(
            (_fmt(ours, digits), _fmt(paper, digits), "" if diff is None else f"{diff:+.{digits}f}")
        )
    return out


def render_markdown(table: DictConfig, rows: list[TableRow]) -> str:
    header = ["row"]
    for col in table.columns:
        header += [f"{col.label} (ours)", f"{col.label} (paper)", "Δ"]
    lines = [f"### {table.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        label = row.label if row.finished else f"{row.label} {MISSING_MARK} no run"
        cells = [c for triple in _cells(table, row) for c in triple]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    if table.get("note"):
        lines += ["", str(table.note).strip()]
    return "\n".join(lines) + "\n"


def render_latex(table: DictConfig, rows: list[TableRow]) -> str:
    ncol = len(table.columns)
    lines = [r"\begin{tabular}{l" + "rrr" * ncol + "}", r"\toprule"]
    lines.append(
        " & ".join(["Row"] + [rf"\multicolumn{{3}}{{c}}{{{c.label}}}" for c in table.columns])
        + r" \\"
    )
    lines.append(" & ".join([""] + ["ours", "paper", r"$\Delta$"] * ncol) + r" \\")
    lines.append(r"\midrule")
    for row in rows:
        label = row.label if row.finished else rf"{row.label}$^\dagger$"
        cells = [c or "--" for triple in _cells(table, row) for c in triple]
        lines.append(" & ".join([_latex_escape(label), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if any(not r.finished for r in rows):
        lines.append(r"% $^\dagger$ no finished run for this row")
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for a, b in [("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")]:
        text = text.replace(a, b)
    return text


def render_csv(table: DictConfig, rows: list[TableRow]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    header = ["row", "run_dir", "finished"]
    for col in table.columns:
        header += [f"{col.key}/ours", f"{col.key}/paper", f"{col.key}/diff"]
    writer.writerow(header)
    for row in rows:
        writer.writerow(
            [
                row.label,
                row.run_dir,
                row.finished,
                *[c for triple in _cells(table, row) for c in triple],
            ]
        )
    return buf.getvalue()


RENDERERS = {
    "markdown": (render_markdown, "md"),
    "latex": (render_latex, "tex"),
    "csv": (render_csv, "csv"),
}


def render(
    table: DictConfig,
    rows: list[TableRow],
    out_dir: Path | str,
    formats: Sequence[str] = ("markdown", "latex", "csv"),
) -> dict[str, Path]:
    """Write the table in each format to ``out_dir/<name>.<ext>``; returns the paths."""
    from xmodal.runs import atomic_write_text

    out_dir = Path(out_dir)
    written = {}
    for fmt in formats:
        fn, ext = RENDERERS[fmt]
        path = out_dir / f"{table.name}.{ext}"
        atomic_write_text(path, fn(table, rows))
        written[fmt] = path
    return written


def table_config(name: str) -> DictConfig:
    """Load ``conf/table/<name>.yaml``."""
    from xmodal.config import conf_dir

    path = conf_dir() / "table" / f"{name}.yaml"
    if not path.is_file():
        from xmodal.config import list_configs

        raise FileNotFoundError(
            f"no table config {path}; available: {', '.join(list_configs('table')) or 'none'}"
        )
    cfg = OmegaConf.load(path)
    cfg.name = name
    return cfg


def build(
    name: str,
    out_dir: Path | str,
    formats: Sequence[str] = ("markdown", "latex", "csv"),
    extra_overrides: Sequence[str] = (),
) -> tuple[list[TableRow], dict[str, Path]]:
    table = table_config(name)
    rows = collect(table, extra_overrides)
    return rows, render(table, rows, out_dir, formats)


def as_dict(rows: list[TableRow]) -> list[dict[str, Any]]:
    return [row.__dict__ for row in rows]
