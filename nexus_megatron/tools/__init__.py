"""Tools around the optimizer, none of which the algorithm or the engines depend on: ``bench``
(measured bytes, state and time per engine; :mod:`.bench_megatron` for megatron-core), ``plan`` (the
closed-form model of memory and communication), ``compare`` (run-vs-run tables and plots), ``quickstart``
(the README's CPU comparison) and ``sharpness_cli`` (critical sharpness of a pretrained checkpoint).
Each is reached through a ``nexus-megatron`` subcommand (:mod:`nexus_megatron.cli`)."""
