"""An MLServer runtime that serves an ONNX classifier as a thief would: scores or labels only,
optionally behind input preprocessing. Loaded by MLServer from the served folder (it puts
that folder on sys.path); runs in the separate MLServer venv, never in the project's. The
transforms are freemark_oip_preprocess's, copied beside it.

model-settings.json `parameters.extra`:
  answer       "scores" (softmax, FP32 [n, C]) or "labels" (argmax, INT64 [n])
  preprocess   absent, "noise" (Gaussian, `sigma`), "quantise" (`levels`, default 16) or
               "median" (3x3 median filter over the last two axes, edges replicated)
  low, high    the input range quantisation and noise clip to (default 0 and 1)
  sigma        the noise's standard deviation (default 0.1 of the range)
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from freemark_oip_preprocess import median3x3, noise, quantise
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxClassifier(MLModel):
    async def load(self) -> bool:
        params = self.settings.parameters
        extra = dict(params.extra or {}) if params is not None else {}
        path = await get_model_uri(self.settings)  # parameters.uri, relative to the model folder
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._answer = extra.get("answer", "scores")
        self._preprocess = extra.get("preprocess")
        self._low, self._high = float(extra.get("low", 0.0)), float(extra.get("high", 1.0))
        self._sigma = float(extra.get("sigma", 0.1)) * (self._high - self._low)
        self._levels = int(extra.get("levels", 16))
        self._rng = np.random.default_rng()
        return True

    def _transform(self, x: np.ndarray) -> np.ndarray:
        if self._preprocess == "noise":
            return noise(x, sigma=self._sigma, low=self._low, high=self._high, rng=self._rng)
        if self._preprocess == "quantise":
            return quantise(x, levels=self._levels, low=self._low, high=self._high)
        if self._preprocess == "median":
            return median3x3(x)
        return x

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        logits = self._session.run(None, {self._input: self._transform(x)})[0]
        if self._answer == "labels":
            name, out = "label", logits.argmax(axis=1).astype(np.int64)
        else:
            shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
            name, out = "scores", (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id,
                                 outputs=[NumpyCodec.encode_output(name, out)])
