"""Preprocessing: dataset adapters, face and flow stages, the Ray Data pipeline that writes Parquet shards.

``FlowAlgorithm`` is here, free of OpenCV, so that configuration (``grid.config``) can check it on a machine
without OpenCV (a lent GPU machine); :mod:`preprocess.frames` implements both.
"""

from typing import Literal, get_args

FlowAlgorithm = Literal["farneback", "tvl1"]  # Farneback (EPIR's) or TV-L1 (the published MEGC2019 composite's)
FLOW_ALGORITHMS = get_args(FlowAlgorithm)
