"""Prompt hardening: EPO prompt search (optimize) and RESGA / SAEGA hardening on top of it."""
