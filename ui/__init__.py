"""Presentation helpers for app.py."""
