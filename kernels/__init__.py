"""Triton kernels for the two operations Mask R-CNN made famous: RoIAlign and the per-class
sigmoid mask loss. Usable without `mrcnn`; each matches its readable reference in `mrcnn`.
"""
