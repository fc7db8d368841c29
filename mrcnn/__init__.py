"""Mask R-CNN, read and run: the library that the book's chapters pair with.

One concept per module; see the book's index for the map from paper section to module.
"""

__version__ = "0.1.0"
