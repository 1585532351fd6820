"""Pipeline stages: one module per stage, each a Prefect task around a plain function."""
