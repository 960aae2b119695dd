"""The DVC pipeline around the commands: params.yaml -> overrides (params), run folder paths (layout), compute
matching and the calibration files (matching), and what each stage's command can read (deps)."""
