"""Mask R-CNN, read and run: the library that the book's chapters pair with.

One concept per module; see the book's index for the map from paper section to module.
"""

import os

__version__ = "0.1.0"

# Intel MKL (torch's CPU BLAS) chooses its order of summation by the memory alignment of the arrays
# unless asked not to, so two runs of the same training on the same CPU and thread count could
# differ in the last bits (tests/test_determinism.py caught it with two threads): ask for its
# conditional numerical reproducibility, which MKL reads when it first needs it. The user's own
# MKL_CBWR setting is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
