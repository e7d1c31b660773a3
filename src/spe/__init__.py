"""SPE: estimate segmentation performance on unlabeled images.

The model's predictions on new images become the support set of an in-context
segmenter, which segments labeled reference images; how well that goes,
mapped through a calibration fitted across checkpoints, estimates the real
Dice, Jaccard, precision, recall, HD95 and pixel Pearson correlation.
"""

import logging

from spe.errors import SPEError

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["SPEError", "__version__"]
