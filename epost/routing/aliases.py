"""The aliases table (`etc/aliases`, SPEC §3.1) and alias expansion (SPEC §3 step 1).

One line per alias, `name: target, target, ...`. A `name` with `@` is one
address; a bare `name` applies in every local domain. Targets are full
addresses, local or remote. Names match case-insensitively (the local part is
lower-cased for lookup; domains are already canonical).

Expansion is a pure function of (address, table, local domains): depth-first
in target order, each alias applied at most once, loops and chains deeper
than `max_depth` refused. An alias may name itself among other targets
(`bob: bob@x, archive@y`): it then keeps its own mailbox, as in Postfix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from epost.routing.tables import PackedMap, TableError, iter_table_lines
from epost.address import Address, AddressError, parse_mailbox

DEFAULT_MAX_DEPTH = 10
_BARE_DOMAIN = "invalid"  # stands in for the domain when checking a bare name's syntax


@dataclass(frozen=True, slots=True)
class AliasEntry:
    line: int
    name: str  # canonical: "bob" (every local domain) or "bob@example.jp"
    targets: tuple[Address, ...]  # as written, domains canonical


class Aliases:
    """A parsed aliases file; `path` is only used to name it in errors.

    Kept compact: per alias its key and a string holding its line number
    and its targets as written, in a PackedMap; the AliasEntry is made on
    lookup. A 10 MB file holds about 180,000 aliases; as objects they took
    107 MiB and their memory stayed with the daemon after a reload
    (docs/routing.md, "Memory").
    """

    __slots__ = ("path", "_exact", "_bare")

    def __init__(self, path: Path | str = "", exact: dict[str, str] | None = None, bare: dict[str, str] | None = None):
        self.path = path
        self._exact = PackedMap(exact)  # "name@domain", local part lower-cased -> packed entry
        self._bare = PackedMap(bare)  # lower-case local part -> packed entry

    def lookup(self, address: Address, local_domains: frozenset[str]) -> AliasEntry | None:
        """The entry for `address`: `name@domain` wins; a bare `name` only in a local domain."""
        key = _key(address)
        packed = self._exact.get(f"{key.local}@{key.domain}")
        if packed is not None:
            return _unpack(str(key), packed)
        if address.domain in local_domains:
            packed = self._bare.get(key.local)
            if packed is not None:
                return _unpack(str(Address(key.local, _BARE_DOMAIN)).rpartition("@")[0], packed)
        return None

    def entries(self) -> Iterator[tuple[Address | str, AliasEntry]]:
        """(name, entry) for every alias, in no set order: an Address, or a bare lower-case local part."""
        for text, packed in self._exact.items():
            local, _, domain = text.rpartition("@")
            address = Address(local, domain)
            yield address, _unpack(str(address), packed)
        for local, packed in self._bare.items():
            yield local, _unpack(str(Address(local, _BARE_DOMAIN)).rpartition("@")[0], packed)

    def __len__(self) -> int:
        return len(self._exact) + len(self._bare)


def _pack(line: int, target_texts: list[str]) -> str:
    """One string for an entry: its line number, then each target as written, LF-separated (no line holds LF)."""
    return "\n".join([str(line), *target_texts])


def _unpack(name: str, packed: str) -> AliasEntry:
    line, *targets = packed.split("\n")
    return AliasEntry(int(line), name, tuple(parse_mailbox(target) for target in targets))


def load_aliases(path: Path) -> Aliases:
    """Parse the aliases file; a missing file is an empty table, a bad line raises TableError.

    Loops are not checked here (they depend on the local domains): see `check_loops`.
    """
    return parse_aliases(iter_table_lines(path), path)


def parse_aliases(lines: Iterable[tuple[int, str]], path: Path | str) -> Aliases:
    """Build the table from (line number, text) pairs as given by `read_table_lines`."""
    exact: dict[str, str] = {}
    bare: dict[str, str] = {}
    for number, text in lines:
        try:
            key, name, target_texts = _parse_line(text)
        except AddressError as error:
            raise TableError(path, number, str(error)) from None
        table, text_key = (exact, f"{key.local}@{key.domain}") if isinstance(key, Address) else (bare, key)
        if text_key in table:
            first = table[text_key].partition("\n")[0]
            raise TableError(path, number, f"duplicate alias {name!r} (first on line {first})")
        table[text_key] = _pack(number, target_texts)
    return Aliases(path, exact, bare)


def _parse_line(text: str) -> tuple[Address | str, str, list[str]]:
    """(lookup key, canonical name, target texts) for one line, every target checked;
    AddressError (a ValueError) saying what is wrong."""
    key, name, targets_text = _split_name(text)
    targets = []
    for target_text in _split_targets(targets_text):
        if not target_text:
            raise AddressError(f"alias {name!r}: empty target (stray comma?)")
        if _is_bare(target_text):
            raise AddressError(f"alias {name!r}: target {target_text!r} is not a full address (write user@domain)")
        try:
            parse_mailbox(target_text)
        except AddressError as error:
            raise AddressError(f"alias {name!r}: bad target {target_text!r}: {error}") from None
        targets.append(target_text)
    return key, name, targets


def _split_name(text: str) -> tuple[Address | str, str, str]:
    """(lookup key, canonical name, targets text). The name ends at the first ':' leaving a
    valid name on its left, since a quoted local part may itself hold ':'."""
    if ":" not in text:
        raise AddressError("missing ':' after the alias name")
    first_error: AddressError | None = None
    start = 0
    while (colon := text.find(":", start)) != -1:
        start = colon + 1
        try:
            key, name = _parse_name(text[:colon].strip())
        except AddressError as error:
            first_error = first_error or error
            continue
        if not text[start:].strip():
            raise AddressError(f"alias {name!r} has no targets")
        return key, name, text[start:]
    assert first_error is not None
    raise first_error


def _parse_name(text: str) -> tuple[Address | str, str]:
    """(lookup key, canonical name): a lower-case local part for a bare name, else an Address."""
    if not text:
        raise AddressError("empty alias name")
    try:
        if _is_bare(text):
            local = parse_mailbox(f"{text}@{_BARE_DOMAIN}").local.lower()
            return local, str(Address(local, _BARE_DOMAIN)).rpartition("@")[0]
        key = _key(parse_mailbox(text))
        return key, str(key)
    except AddressError as error:
        raise AddressError(f"bad alias name {text!r}: {error}") from None


def _split_targets(text: str) -> list[str]:
    """Split on commas outside double quotes; each item stripped."""
    items, current, quoted, escaped = [], [], False, False
    for char in text:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            items.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    items.append("".join(current).strip())
    return items


def _is_bare(text: str) -> bool:
    """True when `text` has no `@` after its quoted part, i.e. names no domain."""
    return "@" not in text.rpartition('"')[2]


def _key(address: Address) -> Address:
    """The lookup key: local part lower-cased (the domain is already canonical)."""
    return Address(address.local.lower(), address.domain)


class AliasError(ValueError):
    """An address whose expansion cannot finish; str() is one line for a log or a reply."""

    def __init__(self, chain: tuple[Address, ...], message: str) -> None:
        super().__init__(message)
        self.chain = chain


class AliasLoop(AliasError):
    """The chain ends at an address already being expanded (or an alias naming only itself)."""

    def __init__(self, chain: tuple[Address, ...]) -> None:
        super().__init__(chain, "alias loop: " + " -> ".join(map(str, chain)))


class AliasTooDeep(AliasError):
    """More than `max_depth` aliases nested; `chain` holds the first max_depth + 1, outermost first."""

    def __init__(self, chain: tuple[Address, ...], max_depth: int) -> None:
        super().__init__(chain, f"aliases nested deeper than {max_depth}: " + " -> ".join(map(str, chain)))
        self.max_depth = max_depth


@dataclass(frozen=True)
class AliasStep:
    source: Address
    line: int
    targets: tuple[Address, ...]


@dataclass(frozen=True)
class Expansion:
    steps: tuple[AliasStep, ...]  # in the order applied
    finals: tuple[Address, ...]  # first-seen order, no duplicates; (address,) when it is no alias


def expand(
    address: Address,
    aliases: Aliases,
    local_domains: frozenset[str],
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Expansion:
    """Replace aliases by their targets, recursively, until only non-aliases remain.

    Depth-first in target order; an alias reached twice is applied once. Two
    finals are the same address when their lookup keys match in a local
    domain (one mailbox) or match exactly elsewhere (a remote local part may
    be case-sensitive). Raises AliasLoop or AliasTooDeep (AliasErrors).
    """
    steps: list[AliasStep] = []
    finals: dict[Address, Address] = {}
    deepest: dict[Address, tuple[Address, ...]] = {}  # applied alias -> longest alias chain from it

    def add_final(final: Address) -> None:
        finals.setdefault(_key(final) if final.domain in local_domains else final, final)

    def visit(current: Address, chain: tuple[Address, ...]) -> tuple[Address, ...]:
        """Expand `current` below the aliases in `chain`; returns the longest alias chain from it."""
        entry = aliases.lookup(current, local_domains)
        if entry is None:
            add_final(current)
            return ()
        key = _key(current)
        if key in deepest:  # applied already: only its depth here matters
            if len(chain) + len(deepest[key]) > max_depth:
                raise AliasTooDeep((chain + deepest[key])[: max_depth + 1], max_depth)
            return deepest[key]
        if any(_key(outer) == key for outer in chain):
            raise AliasLoop(chain + (current,))
        chain += (current,)
        if len(chain) > max_depth:
            raise AliasTooDeep(chain, max_depth)
        if all(_key(target) == key for target in entry.targets):
            raise AliasLoop(chain + (current,))
        steps.append(AliasStep(current, entry.line, entry.targets))
        longest: tuple[Address, ...] = ()
        for target in entry.targets:
            if _key(target) == key:  # "an alias may include its own name"
                add_final(target)
                continue
            below = visit(target, chain)
            if len(below) > len(longest):
                longest = below
        deepest[key] = (current,) + longest
        return deepest[key]

    visit(address, ())
    return Expansion(tuple(steps), tuple(finals.values()))


def check_loops(
    aliases: Aliases,
    local_domains: frozenset[str],
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> list[TableError]:
    """Every alias that cannot be expanded, as TableErrors for `epost check-config`, by line.

    Each loop is reported once, on the line of its first alias in the file,
    starting from that alias; an alias that only leads into a reported loop is
    not reported again. An alias nested too deeply is reported on its own
    line. A bare name is tried in every local domain. Promise: the list is
    empty exactly when every alias expands without an AliasError.
    """
    starts: list[tuple[int, Address]] = []
    for name, entry in aliases.entries():
        if isinstance(name, Address):
            starts.append((entry.line, name))
        else:
            starts += [(entry.line, Address(name, domain)) for domain in sorted(local_domains)]
    errors: list[TableError] = []
    loops: set[frozenset[Address]] = set()
    too_deep_lines: set[int] = set()
    for line, start in sorted(starts, key=lambda item: item[0]):
        try:
            expand(start, aliases, local_domains, max_depth)
        except AliasLoop as loop:
            cycle = _cycle(loop.chain)
            if frozenset(map(_key, cycle)) in loops:
                continue
            loops.add(frozenset(map(_key, cycle)))
            lines = [aliases.lookup(member, local_domains).line for member in cycle]  # type: ignore[union-attr]
            first = lines.index(min(lines))
            cycle = cycle[first:] + cycle[:first]
            errors.append(TableError(aliases.path, lines[first], str(AliasLoop(cycle + cycle[:1]))))
        except AliasTooDeep as too_deep:
            if line not in too_deep_lines:
                too_deep_lines.add(line)
                errors.append(TableError(aliases.path, line, str(too_deep)))
    return sorted(errors, key=lambda error: error.line)


def _cycle(chain: tuple[Address, ...]) -> tuple[Address, ...]:
    """The aliases of a loop chain that repeat, without the closing repetition: (a, b, a) -> (a, b)."""
    last = _key(chain[-1])
    start = next(i for i, address in enumerate(chain) if _key(address) == last)
    return chain[start:-1]
