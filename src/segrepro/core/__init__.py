"""Torch-free building blocks every layer uses: errors, atomic writes, output paths, provenance
and the device picker."""
