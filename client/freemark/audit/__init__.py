"""Offline checks with the TTP's public key alone: receipts and verdicts (`receipt`), every
registration's state from the log (`registry`), an outside log monitor (`monitor`). No torch.
"""
