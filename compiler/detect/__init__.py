"""Object detection: anchors (k-means over box sizes), the detect layer, its loss and detection training.

Modules are imported by their full name (e.g. `dlc.compiler.detect.anchors`); this file stays import-free so
each module can be added without touching it."""
