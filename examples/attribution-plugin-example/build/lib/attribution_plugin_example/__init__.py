"""Example plugin: negative Euclidean distance in pixel space as an attribution score."""
