"""Deployable artifacts: verified ONNX, dense (merged) weights, dtype-cast checkpoints."""

from lowrank_cli.export.cast import DTYPES, cast_tensors, dtype_name, parse_dtype
from lowrank_cli.export.dense import merge_model, merge_state_dict
from lowrank_cli.export.onnx import OnnxExport, onnx_export_model, onnx_op_counts, run_onnxruntime, verify_onnx, write_verified_onnx
from lowrank_cli.export.verify import compare_outputs, require_match

__all__ = ["DTYPES", "OnnxExport", "cast_tensors", "compare_outputs", "dtype_name", "merge_model", "merge_state_dict", "onnx_export_model",
           "onnx_op_counts", "parse_dtype", "require_match", "run_onnxruntime", "verify_onnx", "write_verified_onnx"]
