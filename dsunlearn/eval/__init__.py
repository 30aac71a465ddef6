"""Evaluation: split metrics, membership-inference attacks and plots, as single-device pure functions.

The engine layer gathers per-chunk statistics from every rank and concatenates them; nothing here knows about ranks.
"""
