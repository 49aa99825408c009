"""Tiny random models in the real on-disk layouts, for the ``gie-edit`` demo and the tests.

Nothing here is needed to run real weights; it exists so every loader can be exercised offline
(no hub) on models small enough for a CPU.
"""
