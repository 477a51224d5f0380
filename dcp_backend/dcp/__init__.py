"""DCP: per-batch blockwise placement of data and attention work (planner) and its executor."""
