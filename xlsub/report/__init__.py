"""The analyze and compare stages' science and output: analyses, tables, figures, verdicts, report.html."""
