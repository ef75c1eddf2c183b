"""The toy world's data: procedurally rendered scenes with exact ground-truth edits, an oracle
judge, the ``editeval-toy`` split, and where the shipped toy models live.

Modules: :mod:`~editeval.toyworld.scenes` (sampling, rendering, captions),
:mod:`~editeval.toyworld.pairs` (edit pairs for the 7 tasks), :mod:`~editeval.toyworld.oracle`,
:mod:`~editeval.toyworld.dataset` (the split, judged by the oracle), :mod:`~editeval.toyworld.models`
(the shipped weights). Training, export and evaluation of the toy models are in
:mod:`editeval.toylab`, above everything else.
"""
