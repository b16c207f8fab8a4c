"""Table specs (the `tables:` section of a paper's YAML), checked eagerly at DAG-build time so
that a typo fails before any training. Torch-free: segrepro.config checks every spec on load.

A row is one (experiment, test protocol) pair; a claim refers to rows by `experiment` or
`experiment@protocol`, a bare experiment meaning protocol `ss`. A table of kind `efficiency` has a
spec of its own (segrepro.config.efficiency_spec).
"""

from __future__ import annotations

from segrepro.core.errors import SegreproError

DEFAULT_PROTOCOL = "ss"
DEFAULT_CLAIM_METRIC = "miou"
# The test servers segrepro.engine.submit writes for (its SERVERS; tests/test_submit.py checks they agree).
TEST_SERVER_FORMATS = ("ade20k_sceneparsing", "cityscapes")


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


def check_table_spec(name: str, spec: dict) -> None:
    """Validate one table spec eagerly, so a typo fails at DAG-build time and not after training."""
    where = f"table {name!r}"
    if not isinstance(spec, dict):
        raise SegreproError(f"{where}: the spec must be a mapping, got {type(spec).__name__}")
    if spec.get("kind") == "efficiency":
        from segrepro.config.efficiency_spec import check_efficiency_spec

        check_efficiency_spec(where, spec)
        return
    if not isinstance(spec.get("title"), str) or not spec["title"]:
        raise SegreproError(f"{where}: missing 'title'")
    metrics = spec.get("metrics")
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise SegreproError(f"{where}: 'metrics' must be a non-empty list of metric names")
    if len(set(metrics)) != len(metrics):
        raise SegreproError(f"{where}: 'metrics' lists a metric twice: {metrics}")

    rows = spec.get("rows")
    if not isinstance(rows, list) or not rows:
        raise SegreproError(f"{where}: 'rows' must be a non-empty list")
    keys = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise SegreproError(f"{where}: row {i + 1} must be a mapping")
        for field in ("label", "experiment"):
            if not isinstance(row.get(field), str) or not row[field]:
                raise SegreproError(f"{where}: row {i + 1} has no '{field}'")
        protocol = row.get("protocol", DEFAULT_PROTOCOL)
        if not isinstance(protocol, str) or not protocol or "@" in protocol or "@" in row["experiment"]:
            raise SegreproError(f"{where}: row {row['label']!r} has a bad experiment or protocol")
        key = row_key(row["experiment"], protocol)
        if key in keys:
            # A claim's ref must point at exactly one row.
            raise SegreproError(f"{where}: row {key!r} appears twice")
        keys.add(key)
        paper = row.get("paper", {}) or {}
        if not isinstance(paper, dict):
            raise SegreproError(f"{where}: row {row['label']!r}: 'paper' must be a mapping of metric to number")
        for metric, value in paper.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise SegreproError(f"{where}: row {row['label']!r}: paper {metric} is not a number: {value!r}")
        if "test_server" in row:
            _check_test_server(where, row)

    _check_grid(where, spec)
    server_rows = {table_row_keys({"rows": [row]})[0] for row in rows if is_test_server(row)}
    if server_rows and (spec.get("grid") or spec.get("flops") or spec.get("kind", "rows") != "rows"):
        raise SegreproError(f"{where}: test-server rows only go in a plain table (no grid, flops or level_matrix)")
    if spec.get("kind", "rows") == "level_matrix":
        if len(rows) != 1:
            raise SegreproError(f"{where}: a level_matrix table analyses exactly one experiment, got {len(rows)} rows")
        matrix = spec.get("paper_matrix") or []
        if any(len(row) != len(matrix) for row in matrix):
            raise SegreproError(f"{where}: 'paper_matrix' must be square (one row and column per level)")

    claims = spec.get("claims", []) or []
    if not isinstance(claims, list):
        raise SegreproError(f"{where}: 'claims' must be a list")
    for i, claim in enumerate(claims):
        if not isinstance(claim, dict) or not isinstance(claim.get("claim"), str):
            raise SegreproError(f"{where}: claim {i + 1} needs a 'claim' text")
        text = claim["claim"]
        metric = claim.get("metric", DEFAULT_CLAIM_METRIC)
        if metric not in metrics:
            raise SegreproError(f"{where}: claim {text!r} uses metric {metric!r}, not among the table's metrics {metrics}")
        if "best" in claim:
            if "better" in claim or "than" in claim:
                raise SegreproError(f"{where}: claim {text!r} mixes 'best' with 'better'/'than'")
            if len(rows) < 2:
                raise SegreproError(f"{where}: claim {text!r} needs at least two rows to pick a best one")
            refs = [claim["best"]]
        else:
            better, than = claim.get("better"), claim.get("than")
            if not isinstance(better, list) or not isinstance(than, list) or not better:
                raise SegreproError(f"{where}: claim {text!r} needs either 'best' or non-empty 'better' and 'than' lists")
            if len(better) != len(than):
                raise SegreproError(
                    f"{where}: claim {text!r} has {len(better)} 'better' refs but {len(than)} 'than' refs"
                )
            refs = better + than
        for ref in refs:
            try:
                key = row_key(*parse_ref(ref))
            except SegreproError as err:
                raise SegreproError(f"{where}: claim {text!r}: {err}") from None
            if key not in keys:
                raise SegreproError(f"{where}: claim {text!r} refers to {ref!r}, which is not a row of the table")
            if key in server_rows:
                raise SegreproError(f"{where}: claim {text!r} refers to {ref!r}, a test-server row: only the server knows its score")


def _check_test_server(where: str, row: dict) -> None:
    server = row["test_server"]
    if not isinstance(server, dict) or set(server) != {"name", "url", "format"} or not all(
            isinstance(v, str) and v for v in server.values()):
        raise SegreproError(f"{where}: row {row['label']!r}: 'test_server' needs exactly 'name', 'url' and 'format'")
    if server["format"] not in TEST_SERVER_FORMATS:
        raise SegreproError(f"{where}: row {row['label']!r}: unknown test-server format {server['format']!r} "
                            f"(known: {', '.join(TEST_SERVER_FORMATS)})")


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
