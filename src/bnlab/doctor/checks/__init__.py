"""The doctor's checks, one per module; each registers itself with
:func:`bnlab.doctor.registry.register` and is found by :func:`~bnlab.doctor.registry.all_checks`
(modules whose name starts with ``_`` are helpers, not checks).

Adding a check: write ``checks/<name>.py`` with one registered function of a
:class:`~bnlab.doctor.registry.Context`, and its test; nothing else lists it.
"""
