"""Combining members, as pure functions of probability arrays: voting (``voting``), fitted weights, Caruana
selection, stacking and class offsets (``blending``), and the nested choice of a method on OOF (``selection``).

May import only ``pipeline.metrics`` and itself: no file is read or written here (the ensemble stage does that).
"""
