"""Catalogue scans, the parts both the API and the coordinator use: the manifest
format (``manifest``), the per-scan results file (``results``) and the folder that
holds them (``folder``)."""
