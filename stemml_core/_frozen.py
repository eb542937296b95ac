"""Result and truth containers whose arrays are read-only as well as their fields."""

from __future__ import annotations

from dataclasses import fields

import numpy as np


class ReadOnlyArrays:
    """Mixin for frozen dataclasses: after ``__init__`` every numpy array field is made read-only,
    so that a result or a ground truth cannot be changed in place by accident (a view of it can
    still be copied and edited)."""

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, np.ndarray):
                value.setflags(write=False)
