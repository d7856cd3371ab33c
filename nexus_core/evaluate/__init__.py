"""Evaluation: predict, score, judge, gates, report and feedback steps; metrics and the rubric judge."""
