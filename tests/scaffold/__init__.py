"""Tests of `kvstack new-service` and `kvstack remove-service` in a copy of the repository."""
