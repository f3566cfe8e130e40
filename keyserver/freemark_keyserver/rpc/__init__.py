"""The gRPC edge: the servicer, call discipline, rate limits and uploads; no business logic.
"""
