"""``xmodal-table table=<name> [formats=...] [out=<dir>] [todo=true] [<override> ...]``.

Collects metrics.json from the run directories a ``conf/table/<name>.yaml`` names, prints the
markdown table and writes markdown, LaTeX and CSV to ``<out>`` (default
``$XMODAL_OUTPUT/tables``), and a matplotlib plot (png) for tables with a ``plot`` section
(X-MoRe's Figure 4: ``xmore_k``). Extra ``key=value`` overrides are applied to every row's run
lookup (e.g. ``data.shapes_world=small``). ``todo=true`` prints instead the command of every run
the table reads that has not finished, one per line (``xmodal-table table=xmore_k todo=true |
sh`` makes them one after the other; or hand them to a launcher).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from xmodal.config import list_configs


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    opts = {"table": None, "formats": "markdown,latex,csv,png", "out": None, "todo": "false"}
    extra = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key in opts:
            opts[key] = value
        elif arg in ("-h", "--help"):
            print(__doc__)
            print("tables:", ", ".join(list_configs("table")))
            return 0
        else:
            extra.append(arg)
    if not opts["table"]:
        print(__doc__, file=sys.stderr)
        print("tables:", ", ".join(list_configs("table")), file=sys.stderr)
        return 2
    from xmodal.errors import EXIT_EXPECTED, XmodalError, expected_message

    try:
        return _run(opts, extra)
    except XmodalError as err:  # an unknown or broken table config, a bad override, ...
        print(f"\nxmodal-table: {expected_message(err)}\n", file=sys.stderr)
        return EXIT_EXPECTED


def _run(opts: dict[str, str], extra: list[str]) -> int:
    from xmodal.tables import build, collect, render_markdown, table_config

    if opts["todo"].lower() in ("true", "1", "yes"):
        rows = collect(table_config(opts["table"]), extra)
        for command in dict.fromkeys(c for row in rows for c in row.todo):
            print(command)
        return 0
    out = Path(opts["out"] or Path(os.environ.get("XMODAL_OUTPUT", "outputs")) / "tables")
    rows, written = build(opts["table"], out, opts["formats"].split(","), extra)
    print(render_markdown(table_config(opts["table"]), rows))
    for fmt, path in written.items():
        print(f"{fmt}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
