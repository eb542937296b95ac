"""Result and truth containers whose arrays are read-only as well as their fields."""

from __future__ import annotations

from dataclasses import fields

import numpy as np


class ReadOnlyArrays:
    """Mixin for frozen dataclasses: after ``__init__`` every numpy array field is replaced by a read-only
    view of itself, so that a result or a ground truth cannot be changed in place by accident (a copy of
    it can still be edited), while an array the caller passed in stays writeable."""

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, np.ndarray):
                view = value.view()
                view.setflags(write=False)
                object.__setattr__(self, field.name, view)
