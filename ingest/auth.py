"""Optional sender authentication for logged mail: DKIM, SPF or DMARC must pass.

A forged ``From: ceo@yourcompany.com`` would otherwise file anything on any contact.
Results come from ``Authentication-Results`` headers added by a server we trust (its
authserv-id is listed in ``ingest.trusted_authserv_ids``; headers from anyone else are
ignored, since a sender can write any header), or, for DKIM, from our own verification
with dkimpy when no trusted header says anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import config

_METHOD = re.compile(r"\b(dkim|spf|dmarc)\s*=\s*([a-z]+)", re.IGNORECASE)


def trusted_results(headers: list[str], trusted_ids: list[str]) -> dict[str, str]:
    """Best result per method (pass wins) from the trusted Authentication-Results headers."""
    trusted = {t.strip().lower() for t in trusted_ids if t.strip()}
    out: dict[str, str] = {}
    for value in headers:
        authserv = value.split(";", 1)[0].strip().split()[0].lower() if value.strip() else ""
        if authserv not in trusted:
            continue
        for method, result in _METHOD.findall(value):
            method, result = method.lower(), result.lower()
            if out.get(method) != "pass":
                out[method] = result
    return out


def verify_dkim(raw: bytes, dnsfunc: Callable | None = None) -> str:
    """Own DKIM verification: ``pass``, ``fail`` or ``none`` (no signature)."""
    if b"dkim-signature:" not in raw[:200000].lower():
        return "none"
    try:
        import dkim

        kwargs = {"dnsfunc": dnsfunc} if dnsfunc else {}
        return "pass" if dkim.verify(raw, timeout=5, **kwargs) else "fail"
    except Exception:
        return "fail"


def check(
    settings: config.Settings,
    auth_headers: list[str],
    load_raw: Callable[[], bytes | None],
    dnsfunc: Callable | None = None,
) -> dict:
    """``{required, results, ok, reason}`` for the configured requirement."""
    required = settings.ingest.require_authentication
    if required == "none":
        return {"required": "none", "results": {}, "ok": True, "reason": "not required"}
    results = trusted_results(auth_headers, settings.ingest.trusted_authserv_ids)
    if required in ("dkim", "any") and "dkim" not in results:
        raw = load_raw()
        if raw is not None:
            results["dkim"] = verify_dkim(raw, dnsfunc) + " (own verification)"
    methods = ("dkim", "spf", "dmarc") if required == "any" else (required,)
    ok = any(results.get(m, "").startswith("pass") for m in methods)
    if ok:
        passed = [m for m in methods if results.get(m, "").startswith("pass")]
        reason = f"{passed[0]} pass"
    else:
        seen = ", ".join(f"{m}={results.get(m, 'none')}" for m in methods)
        reason = f"sender authentication required ({required}) but not passed: {seen}"
    return {"required": required, "results": results, "ok": ok, "reason": reason}
