"""Tracker: pixel and click endpoints, verdicts, notifications; owns the token format."""
