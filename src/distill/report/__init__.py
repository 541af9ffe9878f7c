"""What a run tells its user: ``report.md`` (markdown.py), ``report.html`` (html.py), plots and
the comparison of finished runs (compare.py)."""
