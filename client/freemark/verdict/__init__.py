"""Judging a suspect: the statistics (`stats`), the plain and aligned tests, unit matching
(`canon`) and the decision (`decision`). Imports no torch and no grpc: an auditor can
recompute a verdict's numbers from its readouts alone.
"""
