"""dlc.runtime: onnxruntime sessions, box operations (native NMS family and IoU) and timing."""

from .boxes import batched_nms, box_iou, filter_detections, nms, soft_nms
from .session import Session
from .timing import Latency, measure

__all__ = ["Latency", "Session", "batched_nms", "box_iou", "filter_detections", "measure", "nms", "soft_nms"]
