"""`make compare`'s flow (python -m result_stat.compare), each step a module the data passes through once:
plan (methods x seeds x values) -> runs (run or reuse, per-image predictions) -> tuning (choose on
validation) -> scores and statistics (paired bootstrap, Holm, verdicts) -> report (json, markdown, figures)."""
