"""An example of your own method, kept outside the package: logit matching by mean squared error.

Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NeurIPS 2014, Eq. (1): the student regresses the teacher's
logits, L = (1 / (B·K·h·w)) · Σ (s - t)², here per pixel of the segmentation logits. Listed in params.yaml's
`methods` as `logit_mse` (the config file plugins/method/logit_mse.yaml), it is calibrated, trained under both
protocols and compared like every built-in method; nothing in kdrepro/ is edited.
"""

import torch
from torch import Tensor

from kdrepro.distill import Distiller, register
from kdrepro.models import SegOutput


@register("logit_mse")
class LogitMSE(Distiller):
    """Weighted mean squared error between student and teacher logits (same number of classes)."""

    def __init__(self, student_channels: dict, teacher_channels: dict, weight: float = 1.0):
        super().__init__()
        if student_channels["logits"] != teacher_channels["logits"]:
            raise ValueError("logit_mse needs a student and a teacher with the same classes")
        self.weight = float(weight)

    def forward(self, student: SegOutput, teacher: SegOutput, target: Tensor) -> dict[str, Tensor]:
        loss = torch.mean((student.logits.float() - teacher.logits.float()) ** 2)
        return {"logit_mse": self.weight * loss}
