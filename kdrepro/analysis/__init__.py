"""The analysis of finished runs: tidy tables (results), statistics over seeds (stats) and the paper's claims judged
(verdict)."""
