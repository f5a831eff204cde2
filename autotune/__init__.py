"""autotune: find the best deployable fine-tuned small language model for your hardware."""

import os

# torch's bf16 matmuls on CPU (oneDNN through ideep) cache a primitive per input shape, 1024 of each by default.
# A packed training step brings new lengths almost every step, so a bf16 run's RSS grew ~8 MB per step (2.53
# GiB peak at 150 steps); 64 of each keeps it flat, since a step's shapes repeat over its layers. Both are
# read when torch loads, so they are set here, before autotune imports torch; a user's own setting wins.
for _cache in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
    os.environ.setdefault(_cache, "64")

__version__ = "0.1.0"
