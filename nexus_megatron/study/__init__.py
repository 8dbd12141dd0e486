"""The multi-seed study of Nexus vs AdamW (docs/results.md): :mod:`.runner` (``nexus-megatron
experiment``: prepare, train, match, analyze, report), :mod:`.report` (tables and plots over seeds),
:mod:`.downstream` (log-likelihood multiple-choice evaluation) and :mod:`.minima` (closeness of the
per-source minima)."""
