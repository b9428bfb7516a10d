"""Paper tables from run directories: our numbers beside the paper's, never invented.

A table config (``conf/table/<name>.yaml``) lists rows (an experiment plus the overrides that
identify its run) and columns (metric keys). Each row's run directory is found the way the CLI
computes it (``xmodal.config.compose``), its ``metrics.json`` is read, and the table is rendered as
markdown, LaTeX and CSV. A row without a finished run is marked missing; a cell the run did not
report stays empty; paper numbers come only from the config. A row with ``prefix`` reads every
column key with its first segment (``test``) replaced by the prefix, so one run that reports several
methods (uCLIP's ``compare``: ``test/<method>/<d>/S``) fills several rows; a column marked
``shared: true`` (a property of the run, e.g. the R@K of its ranking) is read unprefixed.

The paper's own layouts:

- **One run per column.** A row with ``metric`` reads that key from one run per column, the
  column's key filling ``{column}`` in the row's ``experiment`` and ``overrides`` (X-MoRe's
  dataset columns: ``experiment: xmore/rn50/{column}``, columns ``oxford_flowers``, ``dtd``, ...).
- **Averages.** A column with ``average`` (a list of column keys, or ``all`` for every other
  column) is the mean of those cells of its row; a row with ``average`` (a list of row labels) is
  the mean of those rows' cells in each column. An average is empty when any cell it averages is
  empty: never the mean of a partial row. The paper's averages come from the config like any
  paper number.
- **Derived paper values.** ``derived: {<column key>: "2 * 55.27 - 42.50"}`` on a row is a value
  xmodal computed from the paper's printed numbers (arithmetic on numbers only), and a column with
  ``derive_paper: true`` averages the row's paper cells where the config gives no paper average.
  Both are marked :data:`DERIVED_MARK` in every format, with a legend line saying how they were
  derived: never shown as the paper's.
- **Runs to make.** Every row records the command of each run it reads that has not finished
  (``TableRow.todo``); ``xmodal-table table=<name> todo=true`` prints them, one per line, so a
  table's config is also the sweep that fills it.
- **Plot.** A table with ``plot: {column: <key>, x: <axis label>, y: <axis label>}`` and rows with
  ``plot: {series: <name>, x: <number>}`` also writes ``<name>.png``: that column against x, one
  line per series, ours solid and the paper's dashed (X-MoRe's Figure 4).
"""

from __future__ import annotations

import ast
import csv
import io
import operator
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from xmodal.config import compose
from xmodal.errors import ConfigError
from xmodal.runs import is_finished, read_metrics

MISSING_MARK = "—"
#: Marks a paper cell (and its Δ) that xmodal derived from the paper's numbers.
DERIVED_MARK = "‡"
DERIVED_LEGEND = (
    f"{DERIVED_MARK} derived by xmodal from the paper's printed numbers, not printed in the paper"
)


@dataclass
class TableRow:
    label: str
    run_dir: str
    ours: dict[str, float | None]
    paper: dict[str, float | None] = field(default_factory=dict)
    finished: bool = False
    #: paper cells xmodal derived: column key -> how (rendered with DERIVED_MARK and a legend)
    derived: dict[str, str] = field(default_factory=dict)
    num_runs: int = 1  # runs the row reads (one per column for a ``metric`` row)
    missing_runs: int = 0
    #: the command of each run the row reads that has not finished (``xmodal-table ... todo=true``)
    todo: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------
# Collecting
# ------------------------------------------------------------------------------------------


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean, or None when any value is missing (never the mean of a partial row)."""
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def average_columns(table: DictConfig) -> dict[str, list[str]]:
    """Each ``average`` column's key -> the keys it averages (``all``: every other column)."""
    plain = [c.key for c in table.columns if c.get("average") is None]
    out = {}
    for col in table.columns:
        spec = col.get("average")
        if spec is None:
            continue
        keys = plain if spec == "all" else [str(k) for k in spec]
        unknown = [k for k in keys if k not in plain and k not in out]
        if unknown or not keys:
            raise ConfigError(
                f"table {table.get('name')}: column {col.key} averages {unknown or 'nothing'}; "
                f"expected `all` or keys of the columns before it: {plain}"
            )
        out[col.key] = keys
    return out


_ARITHMETIC: dict[type, Callable] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.USub: operator.neg,
}


def derive(expression: str) -> float:
    """The value of a derivation such as ``"2 * 55.27 - 42.50"``: numbers, + - * / and
    parentheses only (no names, so a derivation can only use printed numbers)."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            return _ARITHMETIC[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _ARITHMETIC:
            return _ARITHMETIC[type(node.op)](value(node.operand))
        raise ConfigError(
            f"derived value {expression!r}: expected arithmetic on numbers (+ - * / and "
            f"parentheses), found {ast.dump(node)[:60]}"
        )

    try:
        tree = ast.parse(str(expression), mode="eval")
    except SyntaxError as err:
        raise ConfigError(f"derived value {expression!r} is not an expression: {err}") from None
    return value(tree.body)


def paper_cells(
    table: DictConfig, row: DictConfig
) -> tuple[dict[str, float | None], dict[str, str]]:
    """The row's paper cells and which of them xmodal derived (column key -> how): the config's
    ``paper`` values as printed, ``derived`` expressions evaluated, and for ``derive_paper``
    average columns without a printed value, the mean of the row's paper cells they average."""
    keys = {c.key for c in table.columns}
    printed = {k: (None if v is None else float(v)) for k, v in (row.get("paper") or {}).items()}
    derived_exprs = dict(row.get("derived") or {})
    for name, cells in (("paper", printed), ("derived", derived_exprs)):
        unknown = sorted(set(cells) - keys)
        if unknown:
            raise ConfigError(
                f"table {table.get('name')}, row {row.label!r}: {name} keys {unknown} are not "
                f"column keys ({sorted(keys)})"
            )
    both = sorted(set(printed) & set(derived_exprs))
    if both:
        raise ConfigError(
            f"table {table.get('name')}, row {row.label!r}: {both} are both printed (paper) and "
            "derived; keep the one the paper prints"
        )
    paper = dict(printed)
    derived = {}
    for key, expression in derived_exprs.items():
        paper[key] = derive(expression)
        derived[key] = str(expression)
    for col in table.columns:
        over = average_columns(table).get(col.key)
        if over and col.get("derive_paper", False) and paper.get(col.key) is None:
            mean = _mean([paper.get(k) for k in over])
            if mean is not None:
                paper[col.key] = mean
                derived[col.key] = f"mean of the row's {len(over)} paper cells"
    return paper, derived


def metric_key(key: str, prefix: str | None = None) -> str:
    """The metrics.json key a row reads for column ``key``: ``prefix`` replaces its first segment
    (``metric_key("test/t2i/S", "test/total")`` is ``test/total/t2i/S``)."""
    if not prefix:
        return key
    return f"{prefix}/{key.split('/', 1)[1]}" if "/" in key else key


def collect(table: DictConfig, extra_overrides: Sequence[str] = ()) -> list[TableRow]:
    """Read every row's metrics.json; rows whose run is missing keep empty cells."""
    scale = float(table.get("scale", 1.0))
    averages = average_columns(table)
    plain = [c.key for c in table.columns if c.key not in averages]
    shared = {c.key for c in table.columns if c.get("shared")}
    runs: dict[tuple, tuple[str, dict | None, str]] = {}  # a run read once, whichever rows share it

    def run(task: str, overrides: list[str]) -> tuple[str, dict | None, str]:
        """(run directory, its metrics or None when unfinished, the command that runs it)."""
        key = (task, *overrides, *extra_overrides)
        if key not in runs:
            everything = [*overrides, *extra_overrides]
            run_dir = compose(task, everything).run_dir
            command = " ".join([f"xmodal-{task}", *map(shlex.quote, everything)])
            metrics = read_metrics(run_dir) if is_finished(run_dir) else None
            runs[key] = (run_dir, metrics, command)
        return runs[key]

    def value(metrics: dict | None, key: str) -> float | None:
        if not metrics or metrics.get(key) is None:
            return None
        return float(metrics[key]) * scale

    rows: list[TableRow] = []
    by_label: dict[str, TableRow] = {}
    for row in table.rows:
        paper, derived = paper_cells(table, row)
        task = row.get("task", table.task)
        if row.get("average") is not None:
            sources = [by_label.get(str(label)) for label in row.average]
            if any(s is None for s in sources):
                raise ConfigError(
                    f"table {table.get('name')}, row {row.label!r} averages "
                    f"{list(row.average)}; expected labels of rows above it"
                )
            ours = {k: _mean([s.ours[k] for s in sources]) for k in plain}
            num_runs = sum(s.num_runs for s in sources)
            todo = [c for s in sources for c in s.todo]
            run_dirs = []
        elif row.get("metric") is not None:  # one run per column
            cells = {}
            for key in plain:  # {column} -> key; any ${...} is left for compose to resolve
                overrides = [f"experiment={str(row.experiment).replace('{column}', key)}"]
                overrides += [o.replace("{column}", key) for o in _raw_overrides(row)]
                cells[key] = run(task, overrides)
            ours = {k: value(metrics, str(row.metric)) for k, (_, metrics, _) in cells.items()}
            run_dirs = [d for d, _, _ in cells.values()]
            num_runs = len(cells)
            todo = [c for _, metrics, c in cells.values() if metrics is None]
        else:
            overrides = [f"experiment={row.experiment}", *_raw_overrides(row)]
            run_dir, metrics, command = run(task, overrides)
            prefix = row.get("prefix")
            ours = {k: value(metrics, k if k in shared else metric_key(k, prefix)) for k in plain}
            run_dirs, num_runs, todo = [run_dir], 1, [command] if metrics is None else []
        for key, over in averages.items():
            ours[key] = _mean([ours[k] for k in over])
        out = TableRow(
            label=str(row.label),
            run_dir="; ".join(dict.fromkeys(run_dirs)),
            ours=ours,
            paper=paper,
            finished=not todo,
            derived=derived,
            num_runs=num_runs,
            missing_runs=len(todo),
            todo=todo,
        )
        rows.append(out)
        by_label[out.label] = out
    return rows


# ------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _cells(table: DictConfig, row: TableRow) -> list[tuple[str, str, str]]:
    """Per column: (ours, paper, ours - paper) as strings; empty where unknown; a derived paper
    cell and its Δ carry DERIVED_MARK."""
    digits = int(table.get("digits", 2))
    out = []
    for col in table.columns:
        ours, paper = row.ours.get(col.key), row.paper.get(col.key)
        diff = None if ours is None or paper is None else ours - paper
        mark = DERIVED_MARK if col.key in row.derived and paper is not None else ""
        paper_text = _fmt(paper, digits) + mark if paper is not None else ""
        diff_text = "" if diff is None else f"{diff:+.{digits}f}{mark}"
        out.append((_fmt(ours, digits), paper_text, diff_text))
    return out


def _label(row: TableRow) -> str:
    """The row label, with how many of its runs are missing."""
    if row.finished:
        return row.label
    if row.num_runs == 1 or row.missing_runs == row.num_runs:
        return f"{row.label} {MISSING_MARK} no run"
    return f"{row.label} {MISSING_MARK} {row.missing_runs} of {row.num_runs} runs missing"


def derived_legend(table: DictConfig, rows: list[TableRow]) -> list[str]:
    """One line per derived paper cell: the row, the column and how it was derived."""
    labels = {c.key: str(c.label) for c in table.columns}
    digits = int(table.get("digits", 2))
    lines = []
    for row in rows:
        for key, how in row.derived.items():
            value = _fmt(row.paper.get(key), digits)
            lines.append(f"{DERIVED_MARK} {row.label}, {labels[key]} = {how} = {value}")
    return [DERIVED_LEGEND + ":", *lines] if lines else []


def render_markdown(table: DictConfig, rows: list[TableRow]) -> str:
    header = ["row"]
    for col in table.columns:
        header += [f"{col.label} (ours)", f"{col.label} (paper)", "Δ"]
    lines = [f"### {table.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [c for triple in _cells(table, row) for c in triple]
        lines.append("| " + " | ".join([_label(row), *cells]) + " |")
    legend = derived_legend(table, rows)
    if legend:
        lines += ["", *[f"{line}  " for line in legend]]
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
        cells = [
            (c or "--").replace(DERIVED_MARK, r"$^\ddagger$")
            for triple in _cells(table, row)
            for c in triple
        ]
        lines.append(" & ".join([_latex_escape(label), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if any(not r.finished for r in rows):
        lines.append(r"% $^\dagger$ no finished run for this row")
    legend = derived_legend(table, rows)
    if legend:  # printed under the table, not a comment: a derived value is never unexplained
        text = [_latex_escape(line).replace(DERIVED_MARK, r"$^\ddagger$") for line in legend]
        lines.append(r"\par{\footnotesize " + r" \\ ".join(text) + "}")
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
    header.append("derived")  # how the cells marked DERIVED_MARK were derived
    writer.writerow(header)
    for row in rows:
        digits = int(table.get("digits", 2))
        how = "; ".join(
            f"{DERIVED_MARK} {k} = {v} = {_fmt(row.paper.get(k), digits)}"
            for k, v in row.derived.items()
        )
        writer.writerow(
            [
                row.label,
                row.run_dir,
                row.finished,
                *[c for triple in _cells(table, row) for c in triple],
                how,
            ]
        )
    return buf.getvalue()


def plot_points(
    table: DictConfig, rows: list[TableRow], source: str
) -> dict[str, list[tuple[float, float]]]:
    """Per series, the (x, value) points of the plotted column from ``ours`` or ``paper``, in x
    order; rows without a value are left out."""
    key = str(table.plot.column)
    series: dict[str, list[tuple[float, float]]] = {}
    for spec, row in zip(table.rows, rows):
        if spec.get("plot") is None:
            continue
        value = getattr(row, source).get(key)
        points = series.setdefault(str(spec.plot.series), [])
        if value is not None:
            points.append((float(spec.plot.x), value))
    return {name: sorted(points) for name, points in series.items()}


def render_plot(table: DictConfig, rows: list[TableRow], path: Path) -> None:
    """``table.plot.column`` against each row's ``plot.x``, one line per series: ours solid,
    the paper's dashed (a derived paper value is named so in the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = str(table.plot.column)
    derived = any(key in row.derived for row in rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    ours, paper = plot_points(table, rows, "ours"), plot_points(table, rows, "paper")
    for i, name in enumerate(ours):
        color = f"C{i}"
        if ours[name]:
            ax.plot(*zip(*ours[name]), "o-", color=color, label=f"{name} (ours)")
        if paper[name]:
            tag = f"paper{DERIVED_MARK}" if derived else "paper"
            ax.plot(*zip(*paper[name]), "s--", color=color, mfc="none", label=f"{name} ({tag})")
    if table.plot.get("log_x", False):
        ax.set_xscale("log", base=2)
    xs = sorted({float(s.plot.x) for s in table.rows if s.get("plot") is not None})
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel(str(table.plot.get("x", "x")))
    ax.set_ylabel(str(table.plot.get("y", key)))
    ax.set_title(str(table.get("plot_title", table.title)), fontsize=9)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    if derived:
        fig.text(0.01, 0.01, DERIVED_LEGEND, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


RENDERERS = {
    "markdown": (render_markdown, "md"),
    "latex": (render_latex, "tex"),
    "csv": (render_csv, "csv"),
}
#: Formats written only for tables that have a ``plot`` section.
PLOTS = {"png": (render_plot, "png")}
FORMATS = ("markdown", "latex", "csv", "png")


def render(
    table: DictConfig,
    rows: list[TableRow],
    out_dir: Path | str,
    formats: Sequence[str] = FORMATS,
) -> dict[str, Path]:
    """Write the table in each format to ``out_dir/<name>.<ext>`` (``png`` only for a table with
    a ``plot`` section); returns the paths."""
    from xmodal.runs import atomic_write_text

    unknown = [f for f in formats if f not in RENDERERS and f not in PLOTS]
    if unknown:
        raise ConfigError(f"formats {unknown}: expected some of {list(FORMATS)}")
    out_dir = Path(out_dir)
    written = {}
    for fmt in formats:
        if fmt in PLOTS:
            if table.get("plot") is None:
                continue
            fn, ext = PLOTS[fmt]
            path = out_dir / f"{table.name}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            fn(table, rows, path)
        else:
            fn, ext = RENDERERS[fmt]
            path = out_dir / f"{table.name}.{ext}"
            atomic_write_text(path, fn(table, rows))
        written[fmt] = path
    return written


def _raw_overrides(row: DictConfig) -> list[str]:
    """A row's overrides as written: an interpolation (``${paths.cache_dir}``) is the run's to
    resolve, as on the command line, not the table config's."""
    raw = OmegaConf.to_container(row, resolve=False).get("overrides") or []
    return [str(o) for o in raw]


def table_config(name: str) -> DictConfig:
    """Load ``conf/table/<name>.yaml``."""
    from xmodal.config import conf_dir

    path = conf_dir() / "table" / f"{name}.yaml"
    if not path.is_file():
        from xmodal.config import list_configs

        raise ConfigError(
            f"no table config {path}. Fix: table=<name> with a name of "
            f"{', '.join(list_configs('table')) or 'none'}"
        )
    import yaml  # OmegaConf's parser: its errors name a line and column, not what to do

    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as error:
        raise ConfigError(
            f"table config {path} is not valid YAML: {error}. Fix: in a flow list, quote an "
            'entry holding braces or a colon ("data=shapes_{column}").'
        ) from None
    cfg.name = name
    return cfg


def build(
    name: str,
    out_dir: Path | str,
    formats: Sequence[str] = FORMATS,
    extra_overrides: Sequence[str] = (),
) -> tuple[list[TableRow], dict[str, Path]]:
    table = table_config(name)
    rows = collect(table, extra_overrides)
    return rows, render(table, rows, out_dir, formats)
