"""Evaluation steps: predict, score, judge, gates, report, feedback."""
