"""The server's side of the transparency log: the ledger it appends to, the full audit.
"""
