"""The parts of the BiGLTraining module that need neither Qt nor the Slicer application.

``command`` (settings -> ``bigl train`` arguments), ``datasetcheck`` (what the data holds before a
run), ``process`` (the training process tree), ``eventlog`` (following ``events.jsonl``),
``curves`` (loss tables and charts as MRML nodes), ``evaluation`` (the ``bigl evaluate`` summary
as a table node) and ``logic`` (all of them together, driven by polling).
"""
