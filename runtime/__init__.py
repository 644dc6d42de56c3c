"""dlc.runtime: onnxruntime sessions, box operations (native NMS and IoU) and timing."""

from .boxes import box_iou, nms
from .session import Session
from .timing import Latency, measure

__all__ = ["Latency", "Session", "box_iou", "measure", "nms"]
