"""Specialize and Fuse (SaF): the pyramidal output maths (`pyramid`), the model
(`specialize_fuse`), its stride-4 feature extractors (`features`, `resnet_decoder`) and the
context heads Table 5 compares against (`context_heads`)."""
