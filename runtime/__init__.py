"""dlc.runtime: onnxruntime sessions, box operations (native NMS family and IoU), detector decode and
post-processing, detection metrics and timing."""

from .boxes import batched_nms, box_iou, filter_detections, nms, soft_nms
from .coco import coco_evaluate
from .detect import decode, postprocess
from .metrics import average_precision, evaluate_detections
from .session import Session
from .timing import Latency, measure

__all__ = ["Latency", "Session", "average_precision", "batched_nms", "box_iou", "coco_evaluate", "decode",
           "evaluate_detections", "filter_detections", "measure", "nms", "postprocess", "soft_nms"]
