"""The freemark trusted third party (TTP) key server."""
