"""Evaluation: bits per byte, task accuracy, report card."""
