"""Datasets in one on-disk layout: `dataset` reads all of them; `synthetic` generates one,
`download`, `extract`, `convert`, `folder` and `prepare` make the others.

Nothing is re-exported here: a module that imports `segrepro.data.dataset` must not depend on
the synthetic generator (segrepro.pipeline.codedeps follows imports to decide what a code change
reruns)."""
