"""Runnable apps that use viewmw the way a user would."""
