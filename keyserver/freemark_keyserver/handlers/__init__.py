"""The TTP's business logic, one module per flow, free of gRPC plumbing. Each RPC of
`rpc.service` calls one handler here, `(ctx, principal, request or stream) -> reply`:

- `register`: Register. The bundle and its binding to the caller, the host re-extracted in
  the sandbox (it must be the model the key was derived on), the prior-claim check
  (`_PriorClaims`: no earlier registration may claim the upload), the reference panel, then
  sealed, stored, logged and signed into a receipt.
- `verify`: Verify. Authorised on its header (`verify_target`) before the suspect is read,
  then read in the sandbox on the registration's triggers, judged (`judge`), logged and
  signed into a verdict.
- `registrations`: GetRegistration, ListRegistrations, Revoke; who sees which registration
  (`visible`), each read as the signed log says it is (`lookup`).
- `proofs`: GetCheckpoint, GetInclusionProof, GetConsistencyProof, GetEntries, GetPublicKey.

What they share:

- `context`: the `Context` every handler takes (config, store, keys, sandbox, ledger), the
  streamed call as a handler reads it (`Stream`), sandbox runs and the status of each way one
  fails, log appends, signed statements and their inclusion proofs.
- `panels`: reading a model for the aligned test, the owner's and the operator's reference
  panels (and the operator's `panel add`), the sealed form of a registration.
- `scans`: locating a key layer in an upload by its values, not its names: the sandbox scan
  and each tensor's judgement (Register's prior-claim check), and a scanned suspect's verdict
  (Verify on an ONNX graph: the strongest candidate, corrected for all of them).
- `hosts`: registered hosts and panel members at rest, sealed in segments, opened into a
  sealed memfd for the sandbox.

Dependencies run one way: `context` < `registrations` < `panels`, `scans` < `register`,
`verify`;
`proofs` needs only `context`; `hosts` needs none of them. This file imports nothing.
"""
