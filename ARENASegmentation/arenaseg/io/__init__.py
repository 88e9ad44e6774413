"""Inputs and outputs: one place decides what an input is and whether it is sound.

An image's way through one ``adapt`` reads forward, each step in one module:

- :mod:`.images` reads it (a file, or a DICOM series folder through :mod:`.dicom`) and
  :mod:`.checks` decides whether it is sound (a regular grid, HU, finite, thick enough);
- :mod:`.labels` reads the painted labelmap (any image file, or a ``.seg.nrrd``) onto the
  image's grid, and :mod:`.annotations` finds the painted slices in it;
- :mod:`arenaseg.preprocessing` takes both to the backbone's canonical grid and the prediction
  back onto the input grid (world geometry helpers in :mod:`.geometry`);
- :mod:`.outputs` writes every output, verified and published together.

Dependencies run one way: geometry ← checks ← dicom ← images ← labels.
"""
