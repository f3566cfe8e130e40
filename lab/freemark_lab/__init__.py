"""The robustness lab: real datasets, reference architectures, training and attacks.

Used by the demo, the tests and the benchmarks to get real models on this machine;
nothing here is downloaded at run time (see docs/assets.md).
"""
