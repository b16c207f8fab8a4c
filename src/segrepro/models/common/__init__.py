"""Layers, losses and backbones more than one model family uses."""
