"""Helpers of the ARENASegmentation module (no Qt): the worker process, the dependency installer,
MRML <-> file I/O, result display and the panel's pure decision functions.

Kept apart from ``ARENASegmentation.py`` so that the module file holds only Slicer's template
classes; everything here also runs with the Qt-free ``slicer-core`` wheel.
"""
