"""The `alignpipe` command line: the top floor, imports flows and core, imported by nothing."""
