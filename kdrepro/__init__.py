"""kdrepro: compute-matched knowledge distillation for semantic segmentation.

Reproducibility package for "The Surprising Effectiveness of Canonical Knowledge Distillation for Semantic
Segmentation" (arXiv 2604.25530).
"""

__version__ = "0.1.0"
