"""Inbound logger: BCC and forwarding addresses."""
