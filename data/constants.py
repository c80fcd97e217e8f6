"""Constants the data modules share (no imports of other fastmae.data modules: the bottom of the graph)."""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("train", "eval")
INTERPOLATIONS = ("bicubic", "bilinear")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# what a sample that cannot be read or decoded does: stop the run, or skip it (data.on_error)
ON_ERROR = ("stop", "skip")
# how a loader orders and reads the shards (data.read): global shuffle with random reads, or streamed
READS = ("global", "stream")
# data.backend: auto picks DALI when it imports, else the torch loader
BACKENDS = ("auto", "dali", "torch", "synthetic")
# data.read: auto streams remote shards and reads local ones globally
READ_CHOICES = ("auto", *READS)
