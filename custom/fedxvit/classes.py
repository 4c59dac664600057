"""Class names and their order: the single source every component reads.

The expert's order is the alphabetical folder order of the public 4-class brain-tumor MRI
layout (Training/<class>), so imported public data and the embedded benchmark agree.
The federated task puts Healthy first so index 1 is the Tumor logit Grad-CAM attributes.
"""

EXPERT_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
TASK_CLASSES = ("Healthy", "Tumor")
TUMOR_TYPES = ("glioma", "meningioma", "pituitary")
HEALTHY_NAME = "notumor"


def task_label(expert_class: str) -> int:
    """Map an expert class name to the 2-class task label (every tumor type -> Tumor)."""
    return TASK_CLASSES.index("Healthy" if expert_class == HEALTHY_NAME else "Tumor")
