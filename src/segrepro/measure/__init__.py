"""Measurements of the models themselves: computation counts (FLOPs), timing and memory
(efficiency tables) and the per-device calibration the planner uses."""
