"""Data formats, loaders and the bundled demo-data generator."""
