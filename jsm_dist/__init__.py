"""jsm_dist: distributed weakly supervised RGB-D salient object detection (JSM, NeurIPS 2021)."""

__version__ = "0.1.0"
