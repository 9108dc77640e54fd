"""Baked images for managed GPU nodes: recipe and Dockerfile, preflight, build/push, node spec."""
