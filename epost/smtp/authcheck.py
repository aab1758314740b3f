"""Inbound SPF, DKIM and DMARC checks for Authentication-Results (SPEC §9, RFC 8601).

Libraries: dkimpy verifies each DKIM signature (already our signer), pyspf
evaluates SPF (RFC 7208 check_host, written by the RFC's co-author; the SPF
engine behind authheaders, Mailman and policyd-spf), asking DNS through the
same seam as `epost check-dns` (`SpfQuery`, epost/routing/records.py), publicsuffixlist gives
the organizational domain DMARC's relaxed alignment needs (it ships the list
and is re-released weekly). DMARC itself (RFC 7489 record lookup and
alignment) is ours and pure: `epost/smtp/authresults.py`. docs/authentication.md
says why not authheaders.

Where the work runs: two jobs per message in a small thread pool of its
own, never on the reactor thread: SPF from the start of DATA (it needs only
the client, HELO and MAIL FROM, so its lookups overlap the transfer), DKIM
and the DMARC record at its end (they need the whole message). Every DNS
query goes to the configured `dns_servers` (else the system's) and gets only
what is left of its job's time budget; the reactor side stops waiting at the
budget plus a second (a full pool), and whatever is unknown then is
`temperror`. The jobs stop at their deadline too (looked at before every
query and every DKIM signature; at most MAX_SIGNATURES are verified), so
a thread the reactor gave up on is free again soon after. Nothing here
ever turns into an SMTP refusal.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Sequence

import dkim
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from epost.headers import header_end, header_from_domains
from epost.routing.dns import make_resolver
from epost.routing.records import DnspythonLookup, DnsUnavailable, Lookup, SpfQuery, memoized
from epost.smtp.authresults import (
    SPF_RESULTS,
    DmarcPolicy,
    MethodResult,
    dkim_properties,
    dmarc_comment,
    dmarc_verdict,
    is_dmarc_record,
    parse_dmarc_record,
)
from epost.smtp.policy import client_address

log = Logger()

REACTOR_GRACE = 1.0  # the reactor waits this much past the budget for a job still queued or running
MAX_SIGNATURES = 8  # DKIM signatures verified per message: dkimpy hashes the whole body again for each


def budgeted(resolver, deadline: float) -> Lookup:
    """One job's `Lookup` (epost/routing/records.py): each query gets only what
    is left until `deadline` (time.monotonic), and each name is asked once
    (SPF for MAIL FROM and for HELO often ask the same one)."""

    def lookup(name: str, rdtype: str) -> list:
        return DnspythonLookup(resolver, _left(deadline))(name, rdtype)

    remembered = memoized(lookup)

    def within_budget(name: str, rdtype: str) -> list:
        _left(deadline)  # a name asked before is no way past the deadline either
        return remembered(name, rdtype)

    return within_budget


def _left(deadline: float) -> float:
    """Seconds left until `deadline`; DnsUnavailable when there are none."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DnsUnavailable("time budget spent")
    return left


def check_resolver(servers: Sequence = ()):
    """A resolver for the checks: `[routing] dns_servers` (else the system's),
    answers kept for their TTL (dnspython's cache is thread-safe: the pool shares it)."""
    resolver = make_resolver(servers, cache=True)
    resolver.timeout = 1.5  # per server try; the budget caps the whole query
    return resolver


def helo_domain(helo: str) -> str | None:
    """The HELO name as an SPF identity: a domain with a dot, not an address literal."""
    name = helo.strip().rstrip(".").lower()
    if not name or "." not in name or name.startswith("[") or ":" in name:
        return None
    try:
        ipaddress.ip_address(name)
        return None
    except ValueError:
        return name


def spf_results(lookup: Lookup, ip: str, sender: str | None, helo: str) -> tuple[list[MethodResult], str | None]:
    """SPF for MAIL FROM and for the HELO name; and the domain SPF passed for
    that DMARC may use (MAIL FROM's, or HELO's for the null sender)."""
    results, dmarc_domain = [], None
    helo_name = helo_domain(helo)
    checks = []
    if sender:
        checks.append(("smtp.mailfrom", sender, sender.rpartition("@")[2].lower()))
    if helo_name:
        checks.append(("smtp.helo", f"postmaster@{helo_name}", helo_name))
    for prop, identity, domain in checks:
        result, _code, explanation = SpfQuery(lookup, ip, identity, helo_name or helo).check()
        if result not in SPF_RESULTS:
            result = "permerror"
        reason = explanation if result in ("temperror", "permerror") else None
        value = helo_name if prop == "smtp.helo" else identity
        results.append(MethodResult("spf", result, ((prop, value),), reason=reason))
        if result == "pass" and (prop == "smtp.mailfrom" or not sender):
            dmarc_domain = domain
    if not checks:
        results.append(MethodResult("spf", "none", (("smtp.helo", helo),), reason="no identity to check"))
    return results, dmarc_domain


class _QuietLogger(logging.Logger):
    """dkimpy logs every failed signature at ERROR; the header says it already."""

    def __init__(self):
        super().__init__("epost.authcheck.dkimpy", logging.CRITICAL + 1)


def dkim_results(lookup: Lookup, message: bytes, deadline: float = float("inf"),
                 limit: int = MAX_SIGNATURES) -> tuple[list[MethodResult], list[str]]:
    """One result per DKIM-Signature (`dkim=none` without any), and the d= of those that passed.

    Each verification hashes the whole body: past `deadline` (time.monotonic)
    the signatures not yet verified are one `temperror`, and those after the
    first `limit` one `policy` (RFC 8601 §2.7.1: signed, but not acceptable
    to us), so one message costs at most `limit` body hashes and stops at its deadline."""
    try:
        verifier = dkim.DKIM(message, logger=_QuietLogger(), minkey=1024)
    except Exception as error:  # dkimpy's parser raises more than DKIMException on odd input
        return [MethodResult("dkim", "neutral", reason=f"message not readable: {error}")], []
    count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    if not count:
        return [MethodResult("dkim", "none")], []
    results, passed = [], []
    for index in range(min(count, limit)):
        if time.monotonic() >= deadline:
            results.append(MethodResult("dkim", "temperror", reason=f"time budget spent: {count - index} of {count} signatures not verified"))
            return results, passed
        state = {"missing": False}

        def key_record(name: bytes, timeout: float = 5) -> bytes | None:
            records = lookup(name.decode("ascii", "replace").rstrip("."), "TXT")
            if not records:
                state["missing"] = True
                return None
            return records[0].encode("utf-8", "surrogateescape")

        verifier.signature_fields = {}
        reason = None
        try:
            result = "pass" if verifier.verify(idx=index, dnsfunc=key_record) else "fail"
            if result == "fail":
                reason = "no key for signature" if state["missing"] else "signature did not verify"
                result = "permerror" if state["missing"] else "fail"
        except DnsUnavailable as error:
            result, reason = "temperror", str(error)
        except dkim.ValidationError as error:
            mismatch = "body hash mismatch" in str(error)
            result = "fail" if mismatch else "neutral"
            reason = "body hash did not verify" if mismatch else str(error)
        except dkim.KeyFormatError as error:  # e.g. a key under 1024 bits (RFC 8301)
            result, reason = "permerror", f"unusable key: {error}"
        except Exception as error:  # malformed signature or key: DKIMException and worse
            result, reason = "neutral", f"signature not usable: {error}"
        fields = verifier.signature_fields or {}
        domain = _text(fields.get(b"d"))
        properties = dkim_properties(domain, _text(fields.get(b"s")), _text(fields.get(b"b")), _text(fields.get(b"i")) or None) if domain else ()
        results.append(MethodResult("dkim", result, properties, reason=reason))
        if result == "pass" and domain:
            passed.append(domain.lower())
    if count > limit:
        results.append(MethodResult("dkim", "policy", reason=f"too many signatures: {count - limit} of {count} not verified"))
    return results, passed


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace").strip() if value else ""


def dmarc_policy_for(lookup: Lookup, head: bytes, org_domain: Callable[[str], str]) -> MethodResult | tuple[DmarcPolicy, str]:
    """RFC 7489 §6.6: the From domain's record, else its organizational domain's.
    A final result (`none`, `permerror`, `temperror`), or the policy and the From domain to judge."""
    domains = header_from_domains(head)
    if len(domains) != 1 or not domains[0]:
        return MethodResult("dmarc", "permerror", reason="not exactly one From address with a domain")
    from_domain = domains[0]
    try:
        policy = _dmarc_policy(lookup, from_domain)
        organization = org_domain(from_domain)
        if policy is None and organization != from_domain:
            policy = _dmarc_policy(lookup, organization)
    except DnsUnavailable as error:
        return MethodResult("dmarc", "temperror", (("header.from", from_domain),), reason=str(error))
    if policy is None:
        return MethodResult("dmarc", "none", (("header.from", from_domain),))
    return policy, from_domain


def judge_dmarc(found: MethodResult | tuple[DmarcPolicy, str], spf_domain: str | None, dkim_domains: list[str], org_domain: Callable[[str], str]) -> MethodResult:
    """The DMARC result once SPF and DKIM are known (no I/O)."""
    if isinstance(found, MethodResult):
        return found
    policy, from_domain = found
    verdict = dmarc_verdict(policy, from_domain, spf_domain, dkim_domains, org_domain)
    return MethodResult("dmarc", verdict, (("header.from", from_domain),), comment=dmarc_comment(policy))


def dmarc_result(lookup: Lookup, head: bytes, spf_domain: str | None, dkim_domains: list[str], org_domain: Callable[[str], str]) -> MethodResult:
    """DMARC for a message whose SPF and DKIM results are known."""
    return judge_dmarc(dmarc_policy_for(lookup, head, org_domain), spf_domain, dkim_domains, org_domain)


def _dmarc_policy(lookup: Lookup, domain: str):
    records = [text for text in lookup(f"_dmarc.{domain}", "TXT") if is_dmarc_record(text)]
    if len(records) != 1:  # none, or several: no DMARC (RFC 7489 §6.6.3)
        return None
    return parse_dmarc_record(records[0])


def load_org_domain() -> Callable[[str], str]:
    """The organizational domain by the Public Suffix List publicsuffixlist ships."""
    from publicsuffixlist import PublicSuffixList

    psl = PublicSuffixList()

    def org_domain(domain: str) -> str:
        name = domain.lower().rstrip(".")
        return psl.privatesuffix(name) or name

    return org_domain


def spf_timed_out(sender: str | None, helo: str, reason: str) -> tuple[list[MethodResult], None]:
    identity = ("smtp.mailfrom", sender) if sender else ("smtp.helo", helo)
    return [MethodResult("spf", "temperror", (identity,), reason=reason)], None


def content_timed_out(reason: str) -> tuple[list[MethodResult], list[str], MethodResult]:
    return [MethodResult("dkim", "temperror", reason=reason)], [], MethodResult("dmarc", "temperror", reason=reason)


class AuthChecker:
    """Runs the checks for messages in `threadpool`, each part within `budget` seconds.

    SPF needs only the client, HELO and MAIL FROM: `begin` starts it when
    DATA starts, so its lookups overlap the message's transfer. DKIM and the
    DMARC record need the message: `PendingCheck.finish` runs them at its end.
    """

    def __init__(self, reactor, threadpool, servers: Sequence = (), budget: float = 4.0, org_domain: Callable[[str], str] | None = None):
        self.reactor = reactor
        self.threadpool = threadpool
        self.budget = budget
        self.resolver = check_resolver(servers)
        self.org_domain = org_domain or load_org_domain()

    def begin(self, client_ip: str, helo: str, sender: str | None) -> PendingCheck:
        spf_d = self._in_pool(self._spf_job, (client_ip, helo, sender), lambda reason: spf_timed_out(sender, helo, reason))
        return PendingCheck(self, spf_d)

    def check(self, client_ip: str, helo: str, sender: str | None, message: bytes) -> Deferred:
        """All at once: a Deferred firing with the list of MethodResults; it never fails."""
        return self.begin(client_ip, helo, sender).finish(message)

    def _in_pool(self, job: Callable, args: tuple, fallback: Callable[[str], object],
                 ended: Callable[[], None] | None = None) -> Deferred:
        """`job(*args, deadline)` in the pool; `fallback(reason)` if it breaks or is late.

        `ended` is called on the reactor thread once the thread is really done
        with the job (which may be long after the Deferred gave up on it)."""
        deadline = time.monotonic() + self.budget
        if ended is not None:
            job = _telling(self.reactor, job, ended)
        d = deferToThreadPool(self.reactor, self.threadpool, job, *args, deadline)

        def broken(failure):
            log.failure("authentication checks failed", failure)
            return fallback("internal error")

        d.addErrback(broken)
        d.addTimeout(self.budget + REACTOR_GRACE, self.reactor, onTimeoutCancel=lambda _result, _timeout: fallback("time budget spent"))
        return d

    # The jobs, blocking: they run in the pool's threads. One that starts after
    # its deadline (queued behind slow ones) does nothing: the reactor has given up on it.

    def _spf_job(self, client_ip: str, helo: str, sender: str | None, deadline: float):
        if deadline <= time.monotonic():
            return spf_timed_out(sender, helo, "time budget spent")
        return spf_results(budgeted(self.resolver, deadline), str(client_address(client_ip)), sender, helo)  # the receiver checks only IP clients

    def _held_content_job(self, held: list[bytes], deadline: float):
        """`_content_job` for the message in `held`, a list the reactor empties
        when it gives up: a job still queued then no longer keeps the bytes alive."""
        try:
            message = held.pop()
        except IndexError:
            return content_timed_out("time budget spent")
        return self._content_job(message, deadline)

    def _content_job(self, message: bytes, deadline: float):
        if deadline <= time.monotonic():
            return content_timed_out("time budget spent")
        lookup = budgeted(self.resolver, deadline)
        dkim_list, dkim_domains = dkim_results(lookup, message, deadline)
        found = dmarc_policy_for(lookup, message[: header_end(message)], self.org_domain)
        return dkim_list, dkim_domains, found

    def results(self, client_ip: str, helo: str, sender: str | None, message: bytes, deadline: float) -> list[MethodResult]:
        """Every check in this thread, one after the other (bench/authres.py)."""
        spf_list, spf_domain = self._spf_job(client_ip, helo, sender, deadline)
        dkim_list, dkim_domains, found = self._content_job(message, deadline)
        return [*spf_list, *dkim_list, judge_dmarc(found, spf_domain, dkim_domains, self.org_domain)]


def _telling(reactor, job: Callable, ended: Callable[[], None]) -> Callable:
    """`job`, calling `ended` on the reactor thread when it returns or raises."""

    def run(*args):
        try:
            return job(*args)
        finally:
            reactor.callFromThread(ended)

    return run


class PendingCheck:
    """One message's checks: SPF under way since DATA began, the rest when the message is complete."""

    def __init__(self, checker: AuthChecker, spf: Deferred):
        self.checker = checker
        self.spf = spf

    def finish(self, message: bytes, let_go: Callable[[], None] | None = None) -> Deferred:
        """A Deferred firing with every MethodResult, in header order; it never fails.

        `let_go` is called (on the reactor thread) once the pool no longer
        holds `message`: when its job has ended, however late. A job that
        starts after the check gave up on it finds the message gone and ends at once."""
        checker = self.checker
        held = [message]
        del message
        content = checker._in_pool(checker._held_content_job, (held,), content_timed_out, let_go)

        def forget(result):  # answered or given up: a job not yet started finds nothing
            held.clear()
            return result

        content.addBoth(forget)

        def judged(parts):
            (spf_list, spf_domain), (dkim_list, dkim_domains, found) = parts
            return [*spf_list, *dkim_list, judge_dmarc(found, spf_domain, dkim_domains, checker.org_domain)]

        return gatherResults([self.spf, content]).addCallback(judged)
