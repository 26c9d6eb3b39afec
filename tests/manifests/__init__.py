"""Tests of the Kubernetes manifests under deploy/."""
