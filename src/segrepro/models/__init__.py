"""Model families, one package each: `pspnet` (PSPNet), `saf` (Specialize and Fuse), `hfgd`
(HFGD); layers, losses and backbones they share in `common`; `factory.build_model` picks one
from the resolved configuration. Nothing is imported here, so that a module using one family's
code does not depend on the others'."""
