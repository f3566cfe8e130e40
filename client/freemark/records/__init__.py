"""The signed records: typed objects (`types`), their field lists (`schema`), and the one
conversion to signed bodies, protobuf messages and JSON files (`wire`). No torch.
"""
