"""Deploying a dyngate model repository beyond one machine: `dyngate deploy kubernetes` (kubernetes.py) writes
Kustomize manifests and the derived Triton image's Dockerfile (image.py)."""
