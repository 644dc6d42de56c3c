"""Static, calibrated INT8 quantization on onnxruntime.quantization, with the format chosen by measurement.

- calibration.py: the training split through the training preprocessing; ranges computed once per run
- formats.py: the candidate formats (QDQ/QOperator × S8S8/U8S8 × per-channel, reduce_range without VNNI)
- precheck.py: refuses already-quantized models; the post-processing tail that stays float
- sensitivity.py: per-layer errors, float vs quantized outputs
- dynamic.py: dynamic INT8, offered for linear-heavy nets only
- search.py: scoring, interleaved timing and greedy layer exclusion
- api.py: quantize_int8 (the entry point), QuantOptions, QuantResult; report.py: the printed report
"""

from .api import QuantOptions, QuantRefused, QuantResult, quantize_file, quantize_int8, write_artifact
from .formats import Candidate, cpu_int8_dot_product
from .search import Timing

__all__ = ["Candidate", "QuantOptions", "QuantRefused", "QuantResult", "Timing", "cpu_int8_dot_product",
           "quantize_file", "quantize_int8", "write_artifact"]
