"""Table specs (the `tables:` section of a paper's YAML), checked eagerly at DAG-build time so
that a typo fails before any training. Torch-free: segrepro.config checks every spec on load.

Structure (keys, types, what each `kind` allows) lives in one place, the `table` definition of
workflow/schemas/params.schema.yaml (its $defs share enumerations between the table kinds); this
module only adds what a schema cannot express: claims naming rows of their table, metrics among
the table's, grid cells, unique rows, test-server formats that segrepro.data.test_servers defines.

A row is one (experiment, test protocol) pair; a claim refers to rows by `experiment` or
`experiment@protocol`, a bare experiment meaning protocol `ss`. A table of kind `efficiency` names
its rows by `id` (segrepro.config.efficiency_spec).
"""

from __future__ import annotations

from segrepro.config.schema import definition, validate
from segrepro.core.errors import SegreproError
from segrepro.data.test_servers import SERVERS

DEFAULT_PROTOCOL = "ss"
DEFAULT_CLAIM_METRIC = "miou"


def row_key(experiment: str, protocol: str) -> str:
    """The key of one table row in the `results` mapping: "exp@protocol"."""
    return f"{experiment}@{protocol}"


def parse_ref(ref: str) -> tuple[str, str]:
    """Split a claim's ref into (experiment, protocol); a bare experiment means protocol `ss`."""
    experiment, sep, protocol = str(ref).partition("@")
    if not sep:
        protocol = DEFAULT_PROTOCOL
    if not experiment or not protocol or "@" in protocol:
        raise SegreproError(f"malformed row reference {ref!r} (expected 'experiment' or 'experiment@protocol')")
    return experiment, protocol


def is_test_server(row: dict) -> bool:
    return bool(row.get("test_server"))


def table_row_keys(spec: dict) -> list[str]:
    """The row keys of a table, in row order (what the workflow must compute for it)."""
    return [row_key(row["experiment"], row.get("protocol", DEFAULT_PROTOCOL)) for row in spec["rows"]]


def check_table_spec(name: str, spec: dict, where: str | None = None) -> None:
    """Validate one table spec: its structure against the schema's `table`, then its cross-references
    (check_table_references). `where` names it in the error (default: table 'NAME')."""
    where = where or f"table {name!r}"
    if not isinstance(spec, dict):
        raise SegreproError(f"{where}: the spec must be a mapping, got {type(spec).__name__}")
    validate(spec, definition("table"), where)
    check_table_references(name, spec, where)


def check_table_references(name: str, spec: dict, where: str | None = None) -> None:
    """What the schema cannot express, on a spec whose structure it accepted: rows unique, grid
    cells on the grid, a square paper matrix, claims naming rows of their table with one of its
    metrics (and no test-server row)."""
    where = where or f"table {name!r}"
    if spec.get("kind") == "efficiency":
        from segrepro.config.efficiency_spec import check_efficiency_references

        check_efficiency_references(where, spec)
        return
    metrics, rows = spec["metrics"], spec["rows"]
    keys = set()
    for row in rows:
        key = row_key(row["experiment"], row.get("protocol", DEFAULT_PROTOCOL))
        if key in keys:
            # A claim's ref must point at exactly one row.
            raise SegreproError(f"{where}: row {key!r} appears twice")
        keys.add(key)
    _check_grid(where, spec)
    for index, row in enumerate(rows):
        if is_test_server(row) and row["test_server"]["format"] not in SERVERS:
            raise SegreproError(
                f"{where}: rows.{index}.test_server.format: {row['test_server']['format']!r}"
                f" is not one of {sorted(SERVERS)}"
            )
    server_rows = {row_key(row["experiment"], row["protocol"]) for row in rows if is_test_server(row)}
    matrix = spec.get("paper_matrix") or []
    if any(len(row) != len(matrix) for row in matrix):
        raise SegreproError(f"{where}: 'paper_matrix' must be square (one row and column per level)")

    for claim in spec.get("claims") or []:
        text = claim["claim"]
        metric = claim.get("metric", DEFAULT_CLAIM_METRIC)
        if metric not in metrics:
            raise SegreproError(f"{where}: claim {text!r} uses metric {metric!r},"
                                f" not among the table's metrics {metrics}")
        if "best" in claim:
            if len(rows) < 2:
                raise SegreproError(f"{where}: claim {text!r} needs at least two rows to pick a best one")
            refs = [claim["best"]]
        else:
            if len(claim["better"]) != len(claim["than"]):
                raise SegreproError(
                    f"{where}: claim {text!r} has {len(claim['better'])} 'better' refs"
                    f" but {len(claim['than'])} 'than' refs"
                )
            refs = claim["better"] + claim["than"]
        for ref in refs:
            key = row_key(*parse_ref(ref))
            if key not in keys:
                raise SegreproError(f"{where}: claim {text!r} refers to {ref!r}, which is not a row of the table")
            if key in server_rows:
                raise SegreproError(f"{where}: claim {text!r} refers to {ref!r}, a test-server row:"
                                    " only the server knows its score")


def _check_grid(where: str, spec: dict) -> None:
    """A grid view needs every row to name one distinct (grid row, grid column) cell."""
    grid = spec.get("grid")
    if grid is None:
        return
    taken = set()
    for row in spec["rows"]:
        cell = tuple(row.get("cell") or ())
        if len(cell) != 2 or cell[0] not in grid["rows"] or cell[1] not in grid["columns"]:
            raise SegreproError(
                f"{where}: row {row['label']!r} needs a 'cell' [grid row, grid column] from "
                f"{grid['rows']} x {grid['columns']}, got {list(cell)}"
            )
        if cell in taken:
            raise SegreproError(f"{where}: two rows fill grid cell {list(cell)}")
        taken.add(cell)
