"""onnxruntime session behind a ``predict_proba`` callable: the pickle-free serving model."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

__all__ = ["OnnxRiskModel"]

_PROBABILITY_OUTPUT = "probabilities"


class OnnxRiskModel:
    """Risk model loaded from ONNX bytes; create once and share.

    ``InferenceSession.run`` is safe to call from many threads at once, so one instance
    serves a whole process (REST workers, stream consumers) without locking.

    One intra-op thread by default: with several, onnxruntime splits small batches over
    the trees and sums their parts in a different order, so a trip scored alone (stream,
    REST) would differ in the last float32 bit from the same trip scored in a batch. Parity
    across paths is worth more than intra-request parallelism; scale out with processes.
    """

    def __init__(self, onnx_bytes: bytes, intra_op_threads: int | None = 1) -> None:
        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        self._session: Any = ort.InferenceSession(
            onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"]
        )
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"expected one model input, found {len(inputs)}")
        self._input_name: str = inputs[0].name
        shape = inputs[0].shape
        self.n_features: int | None = (
            shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None
        )
        outputs = [o.name for o in self._session.get_outputs()]
        if _PROBABILITY_OUTPUT not in outputs:
            raise ValueError(f"model has no {_PROBABILITY_OUTPUT!r} output (outputs: {outputs})")

    def predict_proba(self, x: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        """P(incident) per row; ``x`` is (n, features) in the model card's feature order."""
        matrix = np.ascontiguousarray(x, dtype=np.float32)
        if matrix.ndim != 2:
            raise ValueError(f"expected a 2-D feature matrix, got {matrix.ndim} dimension(s)")
        if self.n_features is not None and matrix.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features, got {matrix.shape[1]}")
        if matrix.shape[0] == 0:
            return np.empty(0, dtype=np.float64)
        (probabilities,) = self._session.run([_PROBABILITY_OUTPUT], {self._input_name: matrix})
        return np.asarray(probabilities[:, 1], dtype=np.float64)

    def __call__(self, x: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        return self.predict_proba(x)
