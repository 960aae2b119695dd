"""The analysis of finished runs: tidy tables (results), statistics over seeds (stats), the paper's claims judged
(verdict), where the results sit (regime), and what is known about each method (methods: metadata and roles)."""
