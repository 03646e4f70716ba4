"""Tuberunner: a PeerTube-compatible remote runner and coordinator that never get stuck."""

__version__ = "0.1.0"
