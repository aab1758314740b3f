"""`epost check-dns DOMAIN` (SPEC §9): what the world's DNS says about a domain epost sends for.

Each check is a function of plain values and one lookup seam (`Lookup`: name
and record type in, plain values out), so the verdicts and the records
proposed as fixes are tested without a DNS server, and the same functions
serve the command and Mail Control's dashboard (which runs them in a thread),
both through `DnsRun`: one run of the checks, its DNS answers kept for it alone.
SPF is evaluated by pyspf (RFC 7208, with its 10-lookup and void-lookup
limits), asking through the same seam instead of its own module-wide resolver.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import dns.reversename

from epost.delivery.signing import zone_txt  # one TXT splitting for DKIM, SPF and DMARC fixes
from epost.logs import printable

# The lookup seam and pyspf over it live in epost/routing/records.py (inbound
# Authentication-Results uses them too); DnsUnavailable stays importable from here.
from epost.routing.records import DnspythonLookup, DnsUnavailable, Lookup, SpfQuery, memoized
from epost.smtp.authresults import POLICIES, dmarc_tags, is_dmarc_record, tag_list  # one DMARC reading for both


@dataclass(frozen=True)
class Finding:
    """One line of the report: `status  check  detail`, and what to do about it."""

    status: str  # "ok" | "warn" | "fail"
    check: str  # "dns" | "mx" | "spf" | "dkim" | "dmarc" | "rdns" | "addresses"
    detail: str
    fix: str = ""  # a record to publish, or what to do; "" when nothing needs doing


def format_finding(finding: Finding) -> str:
    """The report's line(s) for a terminal: record text from DNS is escaped
    (no terminal escapes, no lone surrogates from non-UTF-8 bytes)."""
    detail, fix = shown(finding)
    line = f"{finding.status:<4}  {finding.check:<5}  {detail}"
    return f"{line}\n      fix: {fix}" if fix else line


def shown(finding: Finding) -> tuple[str, str]:
    """`detail` and `fix` made printable (epost.logs.printable): they carry
    other people's DNS text, for a terminal or (HTML-escaped after) a page."""
    return printable(finding.detail, join_lines=False), printable(finding.fix, join_lines=False)


# --- the DNS seam --------------------------------------------------------------


def addresses_of(lookup: Lookup, name: str) -> list[str]:
    return [*lookup(name, "A"), *lookup(name, "AAAA")]


# --- MX --------------------------------------------------------------------------


def check_mx(domain: str, hostname: str, lookup: Lookup) -> list[Finding]:
    """MX present and every exchange resolves; a missing MX is a warning when the domain has an address."""
    publish_mx = f"publish {domain}. IN MX 10 {hostname}."
    try:
        records = sorted(lookup(domain, "MX"))
    except DnsUnavailable as error:
        return [Finding("warn", "mx", f"{domain}: lookup failed ({error}); run again")]
    if not records:
        try:
            implicit = addresses_of(lookup, domain)
        except DnsUnavailable as error:
            implicit, problem = [], f"; its address lookup failed ({error})"
        else:
            problem = ""
        if implicit:
            return [Finding("warn", "mx", f"{domain}: no MX record; mail goes to the domain's own address "
                            f"({', '.join(implicit)}, implicit MX)", publish_mx)]
        return [Finding("fail", "mx", f"{domain}: no MX record and no address: nobody can send mail to it{problem}",
                        publish_mx)]
    if all(host == "" for _, host in records):
        return [Finding("fail", "mx", f"{domain}: null MX (RFC 7505): the domain says it accepts no mail",
                        f"replace it: {publish_mx[len('publish '):]}")]
    findings = []
    for preference, host in records:
        if not host:
            continue
        try:
            found = addresses_of(lookup, host)
        except DnsUnavailable as error:
            findings.append(Finding("warn", "mx", f"{domain}: MX {preference} {host}: lookup failed ({error}); run again"))
            continue
        if found:
            findings.append(Finding("ok", "mx", f"{domain}: MX {preference} {host} ({', '.join(found)})"))
        else:
            findings.append(Finding("fail", "mx", f"{domain}: MX {preference} {host} has no A or AAAA record",
                                    f"publish {host}. IN A <its address> (or point the MX at a host that has one)"))
    return findings


# --- SPF -------------------------------------------------------------------------


def evaluate_spf(address: str, domain: str, helo: str, lookup: Lookup) -> tuple[str, str]:
    """RFC 7208 check_host() for mail from `address` with MAIL FROM at `domain`:
    (result, what decided it), result one of pass, fail, softfail, neutral, none, permerror, temperror."""
    query = SpfQuery(lookup, address, f"postmaster@{domain}", helo)
    result, _, explanation = query.check()
    if result in ("permerror", "temperror"):
        return result, explanation
    if result == "none":
        return result, "no SPF record"
    return result, query.mechanism or explanation


def spf_records(texts: Iterable[str]) -> list[str]:
    """The TXT strings that are SPF records (RFC 7208 4.5: `v=spf1` alone or followed by a space)."""
    return [t for t in texts if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]


def ip_term(address: str) -> str:
    ip = ipaddress.ip_address(address)
    return f"ip{ip.version}:{ip}"


def spf_with(record: str | None, addresses: Sequence[str]) -> str:
    """`record` with ip4:/ip6: terms for `addresses` right after `v=spf1` (matched before anything
    else can say no), or a new record allowing just them when there is none."""
    terms = " ".join(ip_term(a) for a in addresses)
    if record is None:
        return f"v=spf1 {terms} -all"
    rest = record[len("v=spf1"):].strip()
    return f"v=spf1 {terms} {rest}".rstrip()


def check_spf(domain: str, addresses: Sequence[str], helo: str, lookup: Lookup) -> list[Finding]:
    """Would each public address get `pass` for MAIL FROM at `domain`? The fix adds every failing one."""
    try:
        records = spf_records(lookup(domain, "TXT"))
    except DnsUnavailable as error:
        return [Finding("warn", "spf", f"{domain}: lookup failed ({error}); run again")]
    if not records:
        fix = f"publish {zone_txt(domain, spf_with(None, addresses))}" if addresses else ""
        return [Finding("fail", "spf", f"{domain}: no SPF record (receivers see SPF none)", fix)]
    if len(records) > 1:
        fix = f"publish {zone_txt(domain, spf_with(None, addresses))} and remove the others" if addresses else "keep one"
        return [Finding("fail", "spf", f"{domain}: {len(records)} SPF records (receivers give permerror): "
                        + " | ".join(records), fix)]
    record = records[0]
    verdicts = [(address, *evaluate_spf(address, domain, helo, lookup)) for address in addresses]
    failing = [address for address, result, _ in verdicts if result not in ("pass", "temperror")]
    fix = ""
    if any(result == "permerror" for _, result, _ in verdicts):  # adding terms cannot mend a broken record
        fix = (f"publish {zone_txt(domain, spf_with(None, addresses))} (or mend the record: at most 10 "
               "include/a/mx/ptr/exists/redirect terms, each name answering)")
    elif failing:
        fix = f"publish {zone_txt(domain, spf_with(record, failing))}"
    findings = []
    for address, result, why in verdicts:
        if result == "pass":
            findings.append(Finding("ok", "spf", f"{domain}: pass for {address} ({why}): {record}"))
        elif result == "temperror":
            findings.append(Finding("warn", "spf", f"{domain}: could not evaluate for {address}: {why}; run again"))
        else:
            findings.append(Finding("fail", "spf", f"{domain}: {result} for {address} ({why}): {record}", fix))
    return findings


# --- DKIM ------------------------------------------------------------------------


def _public_key(der: bytes):
    """A public key from DKIM's p= bytes: SubjectPublicKeyInfo or PKCS#1 RSAPublicKey; None if neither."""
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_der_public_key(der)
    except (ValueError, TypeError):
        pass
    pem = b"-----BEGIN RSA PUBLIC KEY-----\n" + base64.encodebytes(der) + b"-----END RSA PUBLIC KEY-----\n"
    try:
        return serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        return None


def same_public_key(published: str, ours: str, algorithm: str) -> bool:
    """Does a p= value hold the key `ours` (our own p=)? RSA keys also match in the other DER form."""
    try:
        theirs = base64.b64decode("".join(published.split()), validate=True)
    except (binascii.Error, ValueError):
        return False
    mine = base64.b64decode(ours)
    if theirs == mine:
        return True
    if algorithm != "rsa" or not theirs:
        return False
    a, b = _public_key(theirs), _public_key(mine)
    return a is not None and b is not None and hasattr(a, "public_numbers") and a.public_numbers() == b.public_numbers()


def dkim_verdict(texts: Sequence[str], algorithm: str, public_b64: str) -> tuple[str, str]:
    """(status, detail) for the TXT strings at a selector's name against the key epost signs with."""
    if not texts:
        return "fail", "no record"
    if len(texts) > 1:
        return "fail", f"{len(texts)} TXT records (receivers may pick either)"
    tags, problems = tag_list(texts[0])
    if problems:
        return "fail", "malformed record: " + "; ".join(problems)
    if "v" in tags and (tags["v"] != "DKIM1" or texts[0].split("=", 1)[0].strip() != "v"):
        return "fail", "v= must be DKIM1 and come first"
    if "p" not in tags:
        return "fail", "no p= (public key)"
    if not tags["p"]:
        return "fail", "p= is empty: the key is revoked"
    kind = tags.get("k", "rsa").lower()
    if kind != algorithm:
        return "fail", f"k={kind}, but epost signs with an {algorithm} key"
    if not same_public_key(tags["p"], public_b64, algorithm):
        return "fail", f"publishes another key (p={tags['p'][:24]}...)"
    return "ok", f"publishes the key epost signs with ({algorithm})"


def check_dkim(domain: str, specs: Sequence, lookup: Lookup, load=None) -> list[Finding]:
    """Each [[dkim.keys]] entry of the closest matching domain: its selector publishes our public key."""
    from epost.delivery.signing import DkimKeyError, keys_for, load_key, txt_record

    specs = keys_for(domain, tuple(specs))  # what the signer would use (only .domain is read)
    if not specs:
        return [Finding("warn", "dkim", f"{domain}: no [[dkim.keys]] entry: mail is not signed",
                        f"epost dkim keygen {domain}, add the [[dkim.keys]] lines it prints, publish its record")]
    findings = []
    for spec in specs:
        name = f"{spec.selector}._domainkey.{spec.domain}"
        try:
            key = (load or load_key)(spec.domain, spec.selector, spec.key)
        except DkimKeyError as error:
            findings.append(Finding("fail", "dkim", f"{name}: {error}", "epost check-config names the key's problem"))
            continue
        try:
            texts = lookup(name, "TXT")
        except DnsUnavailable as error:
            findings.append(Finding("warn", "dkim", f"{name}: lookup failed ({error}); run again"))
            continue
        status, detail = dkim_verdict(texts, key.algorithm, key.public_b64)
        findings.append(Finding(status, "dkim", f"{name}: {detail}", "" if status == "ok" else f"publish {txt_record(key)}"))
    return findings


# --- DMARC -----------------------------------------------------------------------

def dmarc_problems(record: str) -> tuple[dict[str, str], list[str]]:
    """RFC 7489 6.3: the record's tags, and what makes it unusable."""
    tags, problems = dmarc_tags(record)
    if not is_dmarc_record(record):
        problems.append("must start with v=DMARC1")
    if tags.get("p") not in POLICIES:
        problems.append("p= must be none, quarantine or reject" + (f", got {tags['p']!r}" if "p" in tags else ""))
    if "sp" in tags and tags["sp"] not in POLICIES:
        problems.append(f"sp= must be none, quarantine or reject, got {tags['sp']!r}")
    for name in ("adkim", "aspf"):
        if name in tags and tags[name] not in ("r", "s"):
            problems.append(f"{name}= must be r or s, got {tags[name]!r}")
    if "pct" in tags and not (tags["pct"].isdigit() and 0 <= int(tags["pct"]) <= 100):
        problems.append(f"pct= must be 0..100, got {tags['pct']!r}")
    for name in ("rua", "ruf"):
        for uri in filter(None, (u.strip() for u in tags.get(name, "").split(","))):
            if ":" not in uri:
                problems.append(f"{name}= needs URIs such as mailto:reports@example.com, got {uri!r}")
    return tags, problems


def _near_dmarc(text: str) -> bool:
    """A record meant as DMARC that receivers ignore: first tag v, value DMARC-something in any case."""
    name, equals, value = text.split(";", 1)[0].partition("=")
    return bool(equals) and name.strip().lower() == "v" and value.strip().lower().startswith("dmarc")


def dmarc_record(policy: str, tags: dict[str, str], domain: str) -> str:
    rua = tags.get("rua") or f"mailto:postmaster@{domain}"
    return f"v=DMARC1; p={policy}; rua={rua}"


def check_dmarc(domain: str, lookup: Lookup) -> list[Finding]:
    name = f"_dmarc.{domain}"
    try:
        texts = lookup(name, "TXT")
    except DnsUnavailable as error:
        return [Finding("warn", "dmarc", f"{name}: lookup failed ({error}); run again")]
    # Receivers take only precise v=DMARC1 records; a near miss (v=dmarc1, v=DMARC10) is
    # shown with what is wrong in it rather than as no record at all.
    records = [t for t in texts if is_dmarc_record(t)] or [t for t in texts if _near_dmarc(t)]
    if not records:
        return [Finding("fail", "dmarc", f"{name}: no record",
                        f"publish {zone_txt(name, dmarc_record('none', {}, domain))}")]
    if len(records) > 1:
        return [Finding("fail", "dmarc", f"{name}: {len(records)} records (receivers then apply none): "
                        + " | ".join(records), f"publish {zone_txt(name, dmarc_record('none', {}, domain))} and remove the others")]
    tags, problems = dmarc_problems(records[0])
    if problems:
        policy = tags["p"] if tags.get("p") in POLICIES else "none"
        return [Finding("fail", "dmarc", f"{name}: {'; '.join(problems)}: {records[0]}",
                        f"publish {zone_txt(name, dmarc_record(policy, tags, domain))}")]
    if tags["p"] == "none":
        return [Finding("warn", "dmarc", f"{name}: p=none, reports only (enough for Gmail/Yahoo); move to "
                        f"quarantine, then reject, once the reports show only your own mail: {records[0]}",
                        f"when ready, publish {zone_txt(name, dmarc_record('quarantine', tags, domain))}")]
    return [Finding("ok", "dmarc", f"{name}: p={tags['p']}: {records[0]}")]


# --- reverse DNS -----------------------------------------------------------------


def check_rdns(addresses: Sequence[str], hostname: str, lookup: Lookup) -> list[Finding]:
    """Forward-confirmed reverse DNS: a PTR whose name resolves back to the address; a warning
    when that name is not `hostname` (receivers compare it with EHLO)."""
    findings = []
    for address in addresses:
        ip = ipaddress.ip_address(address)
        reverse = dns.reversename.from_address(str(ip)).to_text(True)
        family = "A" if ip.version == 4 else "AAAA"
        try:
            names = lookup(reverse, "PTR")
            confirmed = [n for n in names if any(ipaddress.ip_address(a) == ip for a in lookup(n, family))]
        except DnsUnavailable as error:
            findings.append(Finding("warn", "rdns", f"{address}: lookup failed ({error}); run again"))
            continue
        ask = f"(set by whoever runs {address}'s network: your provider)"
        if not names:
            findings.append(Finding("fail", "rdns", f"{address}: no PTR record",
                                    f"publish {reverse}. IN PTR {hostname}. {ask}"))
        elif not confirmed:
            findings.append(Finding("fail", "rdns", f"{address}: PTR {', '.join(names)} does not resolve back to {address}",
                                    f"publish {names[0]}. IN {family} {ip}"))
        elif hostname not in confirmed:
            findings.append(Finding("warn", "rdns", f"{address}: PTR {confirmed[0]} resolves back, but the server "
                                    f"says EHLO {hostname}",
                                    f"publish {reverse}. IN PTR {hostname}. {ask}, or set [server] hostname = \"{confirmed[0]}\""))
        else:
            findings.append(Finding("ok", "rdns", f"{address}: PTR {hostname} resolves back to {address}"))
    return findings


# --- all of it -------------------------------------------------------------------


def public_addresses(config_addresses: Sequence, hostname: str, lookup: Lookup) -> tuple[list[str], list[Finding]]:
    """[server] public_addresses, or what `hostname` resolves to (with a line saying so, or why none)."""
    if config_addresses:
        return [str(a) for a in config_addresses], []
    try:
        found = addresses_of(lookup, hostname)
    except DnsUnavailable as error:
        return [], [Finding("warn", "addresses", f"{hostname}: lookup failed ({error}); run again")]
    if not found:
        return [], [Finding("fail", "addresses", f"{hostname} (the hostname) has no A or AAAA record, and "
                            "[server] public_addresses is not set: SPF and reverse DNS cannot be checked",
                            f"publish {hostname}. IN A <the address mail leaves from>, or set [server] public_addresses")]
    return found, [Finding("ok", "addresses", f"{hostname} resolves to {', '.join(found)} (set [server] "
                           "public_addresses if mail leaves from others)")]


def run_checks(domain: str, hostname: str, config_addresses: Sequence, dkim_specs: Sequence,
               lookup: Lookup) -> list[Finding]:
    """Every check for `domain`, in report order: one run of its own. Blocking (DNS, key files): run it off the reactor."""
    return DnsRun(hostname, config_addresses, dkim_specs, lookup)(domain)


def shared_checks(config_addresses: Sequence, hostname: str, lookup: Lookup) -> tuple[list[str], list[Finding], list[Finding]]:
    """What every domain's report shares: (public addresses, the lines on them, their reverse DNS)."""
    addresses, notes = public_addresses(config_addresses, hostname, lookup)
    return addresses, notes, check_rdns(addresses, hostname, lookup)


def domain_checks(domain: str, hostname: str, dkim_specs: Sequence, lookup: Lookup, shared: Callable[[], tuple],
                  load=None) -> list[Finding]:
    """run_checks, the domain-independent part (`shared_checks`) asked of `shared()`
    (once the DNS answers at all), DKIM keys read with `load` (default: load_key)."""
    domain = domain.rstrip(".").lower()
    try:
        lookup(domain, "MX")
    except DnsUnavailable as error:  # nothing else would answer either: one clear line, not twenty
        return [Finding("fail", "dns", f"no answer from the DNS: {error}",
                        "check [routing] dns_servers (or /etc/resolv.conf) and the network, then run again")]
    addresses, notes, rdns = shared()
    return [
        *check_mx(domain, hostname, lookup),
        *notes,
        *(check_spf(domain, addresses, hostname, lookup) if addresses else []),
        *check_dkim(domain, dkim_specs, lookup, load),
        *check_dmarc(domain, lookup),
        *rdns,
    ]


class DnsRun:
    """One run of the checks: `run(domain)` for each domain of it, from any thread.

    `epost check-dns` is a run of one domain; the dashboard starts one run per
    `DnsChecks.start` (every domain due, or all of them on **Check DNS now**).
    Within a run each (name, type) is asked once (`memoized`), and the public
    addresses, their reverse DNS and the DKIM key files are done once; nothing
    is kept from one run to the next, so a new run sees the DNS as it is now."""

    def __init__(self, hostname: str, config_addresses: Sequence, dkim_specs: Sequence, lookup: Lookup) -> None:
        self._hostname = hostname
        self._config_addresses = config_addresses
        self._dkim_specs = dkim_specs
        self._lookup = memoized(lookup)
        self._lock = threading.Lock()
        self._shared: tuple | None = None
        self._keys: dict = {}
        self._keys_lock = threading.Lock()

    @classmethod
    def of_config(cls, config, lifetime: float = 4.0, lookup: Lookup | None = None) -> DnsRun:
        """A run with the config's hostname, public addresses, DKIM keys and DNS servers
        (a resolver of its own, without a TTL cache: `memoized` is the run's only memory)."""
        from epost.routing.dns import make_resolver

        if lookup is None:
            servers = config.routing.dns_servers
            resolver = functools.cache(lambda: DnspythonLookup(make_resolver(servers), lifetime))

            def lookup(name: str, rdtype: str):  # the resolver (resolv.conf read) is made in the pool, not on the reactor
                return resolver()(name, rdtype)
        server = config.server
        return cls(server.hostname, server.public_addresses, config.dkim.keys, lookup)

    def __call__(self, domain: str) -> list[Finding]:
        return domain_checks(domain, self._hostname, self._dkim_specs, self._lookup, self._shared_checks, self._load_key)

    def _shared_checks(self) -> tuple:
        with self._lock:  # the other domains of the run wait for it rather than ask the same
            if self._shared is None:
                self._shared = shared_checks(self._config_addresses, self._hostname, self._lookup)
            return self._shared

    def _load_key(self, domain: str, selector: str, path):
        from epost.delivery.signing import DkimKeyError, load_key

        name = (domain, selector, str(path))
        with self._keys_lock:  # two domains sharing a key read its file once
            found = self._keys.get(name)
            if found is None:
                try:
                    found = load_key(domain, selector, path)
                except DkimKeyError as error:
                    found = error
                self._keys[name] = found
        if isinstance(found, DkimKeyError):
            raise found
        return found


def check_config_domain(config, domain: str, lifetime: float = 4.0) -> list[Finding]:
    """`epost check-dns DOMAIN`: a run of one domain with the config (DnsRun.of_config)."""
    return DnsRun.of_config(config, lifetime)(domain)
