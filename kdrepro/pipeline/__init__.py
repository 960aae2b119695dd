"""The DVC pipeline around the commands: params.yaml -> overrides (params), run folder paths (layout) and what each
stage's command can read (deps)."""
