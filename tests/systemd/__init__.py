"""Tests that boot a real systemd in a container (see box.py); root and systemd-nspawn only."""
