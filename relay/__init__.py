"""Outbound relay: submission server, rewriter, outbox and delivery.

Data flows one way: ``server`` (SMTP, AUTH, sender checks) → ``submit`` (decision,
rows, one rewritten copy per recipient via ``rewrite``/``htmlrewrite``/``htmlscan``/``links``)
→ ``outbox`` (fsync'd spool + row, before 250) → ``delivery`` (upstream or maildir, retries,
``dsn`` reports). ``preview`` runs the same steps without sending or storing.
"""
