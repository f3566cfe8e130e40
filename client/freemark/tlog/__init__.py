"""The transparency log's primitives: Ed25519 signatures over canonical JSON (`signatures`),
C2SP signed notes (`note`), the RFC 6962 Merkle tree, proofs and checkpoints (`merkle`). No torch.
"""
