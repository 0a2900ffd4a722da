"""The built-in runtimes. Each is a plugin like any other: registered in pyproject.toml's
`engine.runtimes` entry-point group and found by engine.discovery; the core imports none of them."""
