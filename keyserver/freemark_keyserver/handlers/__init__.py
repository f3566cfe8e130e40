"""The TTP's business logic, one module per flow, free of gRPC plumbing.
"""
