"""Whole builds from one plan file: stages with manifests, skipped when done, dry runs with estimates."""
