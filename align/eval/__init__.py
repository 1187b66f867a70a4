"""Evaluation: judges of a policy's answers (`judges.py`); trainers call it at their evaluation steps."""
