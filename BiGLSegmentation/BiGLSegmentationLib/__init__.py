"""The BiGL Segmentation module's library: everything except the Qt widget.

* :mod:`.process`: run a command reporting JSON lines, without blocking (no Slicer needed).
* :mod:`.models`: the default model and the user's model folder; importing bundles (no Slicer).
* :mod:`.dependencies`: which Python packages are missing, and installing them in Slicer.
* :mod:`.scene`: volume nodes to NIfTI, results to segmentation/volume/table nodes (MRML, no Qt).
* :mod:`.logic`: one segmentation run (export, ``bigl segment`` subprocess, import) and the logic.
* :mod:`.testing`: tiny model bundles for the tests (pytest and the self-test in Slicer).

Submodules are imported on demand so that the parts without Slicer stay importable without it.
"""
