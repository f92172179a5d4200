"""Outbound relay: submission server, rewriter, outbox and delivery."""
