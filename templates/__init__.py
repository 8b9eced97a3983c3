"""Report templates (Jinja), shipped as package data: ``report.md.j2``, ``report.html.j2`` and one
partial per analysis under ``analyses/`` (``<name>.md.j2``, ``<name>.html.j2``; ``_default`` otherwise).

A package only so that an installed runner finds them (:func:`runner.reports.templates_dir`).
"""
