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


def task_classes(num_classes: int) -> tuple | None:
    """The class names a job of that many classes trains: the 2-class task's, the 4 expert classes (the
    long-tailed scenario, a federated expert), else None (a user's own task, any names)."""
    return {len(TASK_CLASSES): TASK_CLASSES, len(EXPERT_CLASSES): EXPERT_CLASSES}.get(int(num_classes))
