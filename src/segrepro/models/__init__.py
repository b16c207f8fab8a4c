"""Model families, one package each: `pspnet` (PSPNet), `saf` (Specialize and Fuse), `hfgd`
(HFGD); layers, losses and backbones they share in `common`. Each family's constructor takes typed
arguments, the frozen dataclasses of its `config` module (documented field by field);
`factory.build_model` is the one place that reads the resolved `model:` configuration into them.
Nothing is imported here, so that a module using one family's code does not depend on the
others'."""
