"""The torch-free reporting layer: the paper tables and their claims, statistics (bootstrap),
plots and the HTML report. Reads the metrics the engine wrote; never imports the engine, the
models or the measurements."""
