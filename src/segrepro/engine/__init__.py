"""The torch stages: training, evaluation and inference, test-server submissions, SaF's
ground-truth pyramids and level analysis, and the figures that run a model."""
