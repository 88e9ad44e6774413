"""ARENA engine: few-slice adaptation of a frozen 3D CT segmentation backbone with
sparsity-regularised low-rank adapters (Baklouti et al., "Regularized Low-Rank Adaptation for
Few-Shot Organ Segmentation"). Plain Python: torch, MONAI, SimpleITK; no Slicer import."""

__version__ = "0.1.0"
