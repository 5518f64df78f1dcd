"""Evaluation: the validation sets (AIME, AMC, MATH) and the grading of sampled traces (maj@k, pass@k, mean@1)."""
