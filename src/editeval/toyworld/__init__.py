"""The toy world: procedurally rendered scenes with exact ground-truth edits, an oracle judge,
the ``editeval-toy`` split, and training and evaluation of small SD-architecture models on it.

Modules: :mod:`~editeval.toyworld.scenes` (sampling, rendering, captions),
:mod:`~editeval.toyworld.pairs` (edit pairs for the 7 tasks), :mod:`~editeval.toyworld.oracle`,
:mod:`~editeval.toyworld.dataset`, :mod:`~editeval.toylab.training`,
:mod:`~editeval.toyworld.models` (export and shipped weights), :mod:`~editeval.toylab.evaluate`.
"""
