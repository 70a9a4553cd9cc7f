"""Judging policies and reward models: `lit-rlhf eval` / `eval-rm`, judges, statistics, token views and the run reports."""
