"""Baseline CP backends: ring, zigzag ring, LoongTrain (2D: head all-to-all x double ring), and
Transformer Engine. Ring, zigzag and LoongTrain share one ring engine (:mod:`.ring_core`) over the
pluggable block kernel and take every mask, ragged lengths and GQA."""
