"""Reports on finished studies: MLflow runs -> tables (Markdown, LaTeX, CSV) and figures.

Kept light on purpose (no torch, no Ray; of ``nem_study`` only ``nem_study.contract``, the tag
and artifact names the study writes by, standard library only): it reads only what the study wrote
to MLflow, so a report starts in seconds and runs wherever the tracking store is reachable.
``nem-study report`` calls ``analysis.report.make_report``.
"""


class ReportError(Exception):
    """Bad input for a report (no such study, run or store): one line for the user, exit code 2."""
