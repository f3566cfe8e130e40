"""Model formats: one table of every format (`table`), and one module per format with how to
open a file of it that nobody vetted (`pt2` and its vetting, `huggingface`, `onnx`).
"""
