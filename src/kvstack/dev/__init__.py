"""Developer tools (code generation); not used by the running services."""
