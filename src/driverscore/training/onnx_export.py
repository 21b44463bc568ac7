"""Export the trained model to ONNX and prove the export scores like the sklearn model."""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt
from skl2onnx import to_onnx

from driverscore.adapters.onnx_model import OnnxRiskModel
from driverscore.training.model import TrainedModel

__all__ = ["ONNX_ATOL", "ONNX_OPSET", "OnnxParityError", "check_onnx_parity", "export_onnx"]

#: Largest absolute difference in P(incident) allowed between onnxruntime and sklearn.
#: Observed differences are ~2e-7 (float32 arithmetic in the ONNX tree ensemble).
ONNX_ATOL: Final = 1e-5
ONNX_OPSET: Final = 18


class OnnxParityError(RuntimeError):
    """The ONNX export does not reproduce the sklearn probabilities: it must not serve."""


def check_onnx_parity(
    trained: TrainedModel, onnx_bytes: bytes, x: npt.NDArray[Any], atol: float = ONNX_ATOL
) -> float:
    """Max |P_onnx − P_sklearn| over the rows of ``x``.

    Raises :class:`OnnxParityError` when it exceeds ``atol``.
    """
    matrix = np.ascontiguousarray(x, dtype=np.float32)
    expected = trained.predict_proba(matrix)
    actual = OnnxRiskModel(onnx_bytes).predict_proba(matrix)
    diff = float(np.max(np.abs(actual - expected))) if matrix.shape[0] else 0.0
    if not diff <= atol:
        raise OnnxParityError(
            f"ONNX probabilities differ from sklearn by up to {diff:.3g} on {matrix.shape[0]} "
            f"rows (tolerance {atol:g})"
        )
    return diff


def export_onnx(trained: TrainedModel, sample_x: npt.NDArray[Any]) -> bytes:
    """ONNX bytes of the calibrated model, checked for parity on ``sample_x`` (pass the holdout).

    ZipMap is disabled so the ``probabilities`` output is a plain (n, 2) float tensor that
    every runtime reads the same way.
    """
    matrix = np.ascontiguousarray(sample_x, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise ValueError("export_onnx needs a non-empty 2-D sample matrix")
    if matrix.shape[1] != len(trained.feature_names):
        raise ValueError(
            f"sample has {matrix.shape[1]} columns, model expects {len(trained.feature_names)}"
        )
    estimator = trained.estimator
    proto = to_onnx(
        estimator,
        matrix[:1],
        options={id(estimator): {"zipmap": False}},
        target_opset=ONNX_OPSET,
    )
    onnx_bytes: bytes = proto.SerializeToString()
    check_onnx_parity(trained, onnx_bytes, matrix)
    return onnx_bytes
