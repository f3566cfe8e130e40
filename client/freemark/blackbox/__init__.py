"""Output keys: ownership evidence read from a model's answers alone (docs/blackbox.md).

A stolen model is normally sold behind a prediction API, where nobody hands over weights.
An output key holds secret queries, each one of the owner's own images pushed inside a small
L∞ ball so that the host (and the owner's own quick thefts of it) answer with a target class
chosen by a watermark bit while independently trained models do not. The modules, lowest
first: `responder` (what answers: the `Responder` protocol and how its answers are read),
`key` (the output key and its encrypted file), `surrogates` (the owner's thefts of his own
host, made automatically), `queries` (deriving the queries by gradient descent), `judge`
(a verdict on a Responder), `local` (a Responder over a local model file).
"""
