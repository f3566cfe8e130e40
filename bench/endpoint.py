"""Endpoint client benchmark (issue 19): `EndpointSession.answer` on 256 queries against a
real MLServer, against the endpoint's own time for the same queries, in one run.

    PYTHONPATH=client:keyserver:lab:tests .venv/bin/python bench/endpoint.py --json out/bench_endpoint.json

The server (tests/oip_servers.py, from `.venv-oip`) serves the lab's MNIST CNN architecture
(28 x 28 inputs, 10 classes) exported to ONNX, as a scores and a labels-only endpoint. The
weights are a seeded initialisation: what is timed is the HTTP and JSON path and the
server's inference, which do not depend on what the weights learnt. Queries: 256 uint8
images, as an image API takes them (the key's dtype), sent to the FP32 input.

Then, `--repeats` times (medians reported), for each endpoint:

- floor: the endpoint's own time for the same queries: the same four 64-input request
  bodies POSTed over plain http.client and read whole, nothing checked;
- client: a fresh `EndpointSession` (allow-list check, metadata, 256 queries and the policy's
  32 repeats in 64-input batches, every reply checked, the transcript);
- client without repeats: the same with `repeats=0`, to show what the consistency check costs;

and the ratios client / floor. The issue's goal for an endpoint Verify is at most 1.2 x the
endpoint's own time; the client is the part of it spent talking to the endpoint.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _table import print_table, write_json

from freemark.endpoint import EndpointPolicy, EndpointSession
from freemark.endpoint.oip import encode_infer
from freemark_lab.models import ARCHITECTURES
from oip_servers import ServedModel, export_onnx, serve

QUERIES = 256
RATIO_GOAL = 1.2
SHAPE = (1, 28, 28)


def floor(url: str, model: str, bodies: list[bytes]) -> float:
    """Seconds to POST `bodies` to the model's infer path and read each answer, unchecked."""
    port = int(url.rsplit(":", 1)[1])
    began = time.perf_counter()
    for body in bodies:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", f"/v2/models/{model}/infer", body=body,
                     headers={"Content-Type": "application/json", "Connection": "close"})
        response = conn.getresponse()
        response.read()
        conn.close()
        assert response.status == 200, response.status
    return time.perf_counter() - began


def client(url: str, model: str, queries: np.ndarray, policy: EndpointPolicy) -> float:
    began = time.perf_counter()
    session = EndpointSession(url, model, policy=policy)
    session.answer(queries)
    session.transcript()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    torch.manual_seed(0)
    queries = np.random.default_rng(0).integers(0, 256, size=(QUERIES, *SHAPE), dtype=np.uint8)
    policy = EndpointPolicy(allow=("127.0.0.1",))
    bare = EndpointPolicy(allow=("127.0.0.1",), repeats=0)
    rows: list[list[Any]] = []
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        onnx = export_onnx(ARCHITECTURES["mnist"](), root / "mnist.onnx", SHAPE)
        served = [ServedModel("mnist-scores", onnx, SHAPE, 10, "scores"),
                  ServedModel("mnist-labels", onnx, SHAPE, 10, "labels")]
        with serve(served, root / "server") as server:
            for model in ("mnist-scores", "mnist-labels"):
                meta = EndpointSession(server.url, model, policy=policy).metadata()
                bodies = [encode_infer(queries[i:i + 64], meta, np.dtype(np.float32), str(i))
                          for i in range(0, QUERIES, 64)]
                floor(server.url, model, bodies)  # warm-up: the server's first batches
                times: dict[str, list[float]] = {"floor": [], "client": [], "no_repeats": []}
                for _ in range(args.repeats):
                    times["floor"].append(floor(server.url, model, bodies))
                    times["client"].append(client(server.url, model, queries, policy))
                    times["no_repeats"].append(client(server.url, model, queries, bare))
                med = {k: statistics.median(v) for k, v in times.items()}
                row = {"model": model, "queries": QUERIES, "floor_s": med["floor"],
                       "client_s": med["client"], "client_no_repeats_s": med["no_repeats"],
                       "ratio": med["client"] / med["floor"],
                       "ratio_no_repeats": med["no_repeats"] / med["floor"],
                       "server_ready_s": server.started_in_s}
                results.append(row)
                rows.append([model, med["floor"], med["client"], row["ratio"],
                             med["no_repeats"], row["ratio_no_repeats"]])
    print_table(f"endpoint client vs the endpoint's own time, {QUERIES} queries "
                f"(medians of {args.repeats}; goal for Verify <= {RATIO_GOAL} x)",
                ["endpoint", "floor s", "client s", "ratio", "no repeats s", "ratio"], rows)
    if args.json:
        write_json(args.json, {"endpoint": results, "ratio_goal": RATIO_GOAL})


if __name__ == "__main__":
    main()
