"""The key's parts (docs/design.md §1): the watermark bits, trigger sets (images, text), alignment
probes, activations read from a model, the key derivation, and the key bundle file.
"""
