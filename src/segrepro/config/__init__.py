"""The torch-free configuration layer: the validated registry of params/ and the resolution of one
run's configuration (`params`), the table specs it checks on load (`table_specs`,
`efficiency_spec`) and the model families' module names (`families`). Nothing is re-exported
here, so that a model importing `families` does not depend on the registry's code."""
