"""The aliases table names each alias once, points at bad lines, and expands without looping."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epost.routing.aliases import (
    AliasError,
    AliasLoop,
    Aliases,
    AliasStep,
    AliasTooDeep,
    check_loops,
    expand,
    load_aliases,
    parse_aliases,
)
from epost.routing.tables import TableError
from epost.address import Address, parse_mailbox

LOCAL = frozenset({"example.jp", "example.com"})


def a(text: str) -> Address:
    return parse_mailbox(text)


def table(*lines: str) -> Aliases:
    """Lines numbered from 1, as if read from a file called `aliases`."""
    return parse_aliases(list(enumerate(lines, start=1)), "aliases")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aliases"
    path.write_text(text)
    return path


# Parsing


def test_good_file_gives_entries_with_their_line_numbers(tmp_path: Path) -> None:
    text = (
        "# the aliases\n"
        "\n"
        "postmaster: root@example.jp\n"
        "  team@example.jp :  alice@example.jp ,bob@partner.jp  \n"
        "\t# indented comment\n"
        'abuse: "odd, name"@example.jp, root@example.jp\n'
    )
    aliases = load_aliases(write(tmp_path, text))
    assert len(aliases) == 3
    postmaster = aliases.lookup(a("postmaster@example.jp"), LOCAL)
    assert postmaster is not None
    assert (postmaster.line, postmaster.name, postmaster.targets) == (3, "postmaster", (a("root@example.jp"),))
    team = aliases.lookup(a("team@example.jp"), LOCAL)
    assert team is not None
    assert (team.line, team.name, team.targets) == (4, "team@example.jp", (a("alice@example.jp"), a("bob@partner.jp")))
    abuse = aliases.lookup(a("abuse@example.jp"), LOCAL)
    assert abuse is not None
    assert abuse.targets == (Address("odd, name", "example.jp"), a("root@example.jp"))


def test_missing_file_is_an_empty_table(tmp_path: Path) -> None:
    aliases = load_aliases(tmp_path / "nope")
    assert len(aliases) == 0
    assert aliases.lookup(a("postmaster@example.jp"), LOCAL) is None


def test_quoted_name_may_hold_a_colon() -> None:
    aliases = table('"a:b"@example.jp: root@example.jp')
    entry = aliases.lookup(Address("a:b", "example.jp"), LOCAL)
    assert entry is not None and entry.targets == (a("root@example.jp"),)


def test_international_domains_are_stored_as_a_labels() -> None:
    aliases = table("info@Bücher.example: shop@Bücher.example")
    entry = aliases.lookup(a("info@xn--bcher-kva.example"), LOCAL)
    assert entry is not None and entry.targets == (a("shop@xn--bcher-kva.example"),)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("postmaster root@example.jp", "missing ':'"),
        (": root@example.jp", "empty alias name"),
        ("post master: root@example.jp", "bad alias name 'post master'"),
        ("team@: root@example.jp", "bad alias name 'team@'"),
        ("postmaster:", "alias 'postmaster' has no targets"),
        ("postmaster:   ", "alias 'postmaster' has no targets"),
        ("postmaster: root", "target 'root' is not a full address"),
        ("postmaster: root@example.jp,, admin@example.jp", "empty target"),
        ("postmaster: root@example.jp,", "empty target"),
        ("postmaster: root@", "bad target 'root@'"),
        ("postmaster: ro ot@example.jp", "bad target 'ro ot@example.jp'"),
    ],
)
def test_bad_line_is_reported_with_its_line_number(tmp_path: Path, line: str, problem: str) -> None:
    path = write(tmp_path, f"# aliases\nabuse: root@example.jp\n{line}\nother: root@example.jp\n")
    with pytest.raises(TableError) as caught:
        load_aliases(path)
    assert caught.value.line == 3
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"{path}:3: ")


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("postmaster", "postmaster"),
        ("postmaster", "PostMaster"),
        ("team@example.jp", "TEAM@Example.JP"),
    ],
)
def test_duplicate_name_ignoring_case_is_reported_on_its_second_line(first: str, second: str) -> None:
    with pytest.raises(TableError) as caught:
        table(f"{first}: root@example.jp", "other: root@example.jp", f"{second}: admin@example.jp")
    assert caught.value.line == 3
    assert "duplicate alias" in caught.value.problem and "first on line 1" in caught.value.problem


def test_bare_and_full_name_for_the_same_user_are_not_duplicates() -> None:
    aliases = table("info: a@example.jp", "info@example.jp: b@example.jp")
    assert len(aliases) == 2


@given(st.lists(st.text(max_size=40), max_size=5))
def test_parser_raises_nothing_but_table_errors(texts: list[str]) -> None:
    try:
        parse_aliases(list(enumerate(texts, start=1)), "aliases")
    except TableError as error:
        assert 1 <= error.line <= len(texts)


# Lookup


def test_bare_name_applies_in_every_local_domain_only() -> None:
    aliases = table("postmaster: root@example.jp")
    assert aliases.lookup(a("postmaster@example.jp"), LOCAL) is not None
    assert aliases.lookup(a("postmaster@example.com"), LOCAL) is not None
    assert aliases.lookup(a("postmaster@partner.jp"), LOCAL) is None
    assert aliases.lookup(a("postmaster@example.jp"), frozenset()) is None


def test_full_name_applies_only_in_its_own_domain() -> None:
    aliases = table("team@example.jp: root@example.jp", "sales@partner.jp: root@example.jp")
    assert aliases.lookup(a("team@example.jp"), LOCAL) is not None
    assert aliases.lookup(a("team@example.com"), LOCAL) is None
    assert aliases.lookup(a("sales@partner.jp"), LOCAL) is not None  # an explicit address needs no local domain


def test_lookup_ignores_case_in_name_and_address() -> None:
    aliases = table("PostMaster: root@example.jp", "Team@Example.JP: root@example.jp")
    assert aliases.lookup(a("POSTMASTER@EXAMPLE.JP"), LOCAL) is not None
    assert aliases.lookup(a("postmaster@example.jp"), LOCAL) is not None
    assert aliases.lookup(a("tEAM@eXAMPLE.jp"), LOCAL) is not None


def test_exact_name_wins_over_bare_name_in_either_file_order() -> None:
    for lines in (("info: bare@example.jp", "info@example.jp: exact@example.jp"),
                  ("info@example.jp: exact@example.jp", "info: bare@example.jp")):
        aliases = table(*lines)
        exact = aliases.lookup(a("info@example.jp"), LOCAL)
        bare = aliases.lookup(a("info@example.com"), LOCAL)
        assert exact is not None and exact.targets == (a("exact@example.jp"),)
        assert bare is not None and bare.targets == (a("bare@example.jp"),)


# Expansion


def test_address_that_is_no_alias_is_its_own_final() -> None:
    expansion = expand(a("alice@example.jp"), table("postmaster: root@example.jp"), LOCAL)
    assert expansion.steps == ()
    assert expansion.finals == (a("alice@example.jp"),)


def test_nested_aliases_expand_depth_first_with_steps_in_order() -> None:
    aliases = table(
        "all: staff@example.jp, partners@example.jp",
        "staff: alice@example.jp, bob@example.jp",
        "partners: carol@partner.jp",
    )
    expansion = expand(a("all@example.jp"), aliases, LOCAL)
    assert expansion.steps == (
        AliasStep(a("all@example.jp"), 1, (a("staff@example.jp"), a("partners@example.jp"))),
        AliasStep(a("staff@example.jp"), 2, (a("alice@example.jp"), a("bob@example.jp"))),
        AliasStep(a("partners@example.jp"), 3, (a("carol@partner.jp"),)),
    )
    assert expansion.finals == (a("alice@example.jp"), a("bob@example.jp"), a("carol@partner.jp"))


def test_remote_target_is_not_expanded_by_a_bare_alias_of_the_same_name() -> None:
    aliases = table("info: info@partner.jp, desk@example.jp", "desk: alice@example.jp")
    expansion = expand(a("info@example.jp"), aliases, LOCAL)
    assert expansion.finals == (a("info@partner.jp"), a("alice@example.jp"))


def test_duplicate_finals_are_removed_keeping_first_seen_order() -> None:
    aliases = table(
        "all: bob@example.jp, team@example.jp, Alice@Example.JP",
        "team: alice@example.jp, BOB@example.jp, carol@partner.jp",
    )
    expansion = expand(a("all@example.jp"), aliases, LOCAL)
    assert expansion.finals == (a("bob@example.jp"), a("alice@example.jp"), a("carol@partner.jp"))


def test_remote_finals_differing_in_case_are_kept_apart() -> None:
    aliases = table("x: Bob@partner.jp, bob@partner.jp, bob@partner.jp")
    assert expand(a("x@example.jp"), aliases, LOCAL).finals == (a("Bob@partner.jp"), a("bob@partner.jp"))


def test_alias_including_its_own_name_keeps_itself_as_a_final() -> None:
    aliases = table("bob: Bob@example.jp, archive@partner.jp")
    expansion = expand(a("bob@example.jp"), aliases, LOCAL)
    assert expansion.steps == (AliasStep(a("bob@example.jp"), 1, (a("Bob@example.jp"), a("archive@partner.jp"))),)
    assert expansion.finals == (a("Bob@example.jp"), a("archive@partner.jp"))


def test_self_inclusion_reached_through_another_alias_is_not_a_loop() -> None:
    aliases = table("team: bob@example.jp, carol@example.jp", "bob: bob@example.jp, archive@partner.jp")
    expansion = expand(a("team@example.jp"), aliases, LOCAL)
    assert expansion.finals == (a("bob@example.jp"), a("archive@partner.jp"), a("carol@example.jp"))


def test_loop_between_two_aliases_raises_naming_the_chain() -> None:
    aliases = table("a: b@example.jp", "b: x@partner.jp, A@example.jp")
    with pytest.raises(AliasLoop) as caught:
        expand(a("a@example.jp"), aliases, LOCAL)
    assert caught.value.chain == (a("a@example.jp"), a("b@example.jp"), a("A@example.jp"))
    assert str(caught.value) == "alias loop: a@example.jp -> b@example.jp -> A@example.jp"
    assert isinstance(caught.value, AliasError) and isinstance(caught.value, ValueError)


def test_alias_naming_only_itself_is_a_loop() -> None:
    aliases = table("a: A@example.jp, a@example.jp")
    with pytest.raises(AliasLoop) as caught:
        expand(a("a@example.jp"), aliases, LOCAL)
    assert caught.value.chain == (a("a@example.jp"), a("a@example.jp"))


def test_loop_below_an_outer_alias_names_the_whole_chain() -> None:
    aliases = table("outer: a@example.jp", "a: b@example.jp", "b: a@example.jp")
    with pytest.raises(AliasLoop) as caught:
        expand(a("outer@example.jp"), aliases, LOCAL)
    assert [str(address) for address in caught.value.chain] == [
        "outer@example.jp", "a@example.jp", "b@example.jp", "a@example.jp"
    ]


def chain_table(aliases: int) -> Aliases:
    """l1 -> l2 -> ... -> l<aliases> -> final@partner.jp."""
    lines = [f"l{n}: l{n + 1}@example.jp" for n in range(1, aliases)]
    return table(*lines, f"l{aliases}: final@partner.jp")


def test_ten_nested_aliases_are_allowed() -> None:
    expansion = expand(a("l1@example.jp"), chain_table(10), LOCAL)
    assert len(expansion.steps) == 10
    assert expansion.finals == (a("final@partner.jp"),)


def test_eleven_nested_aliases_are_too_deep() -> None:
    with pytest.raises(AliasTooDeep) as caught:
        expand(a("l1@example.jp"), chain_table(11), LOCAL)
    assert len(caught.value.chain) == 11
    assert str(caught.value).startswith("aliases nested deeper than 10: l1@example.jp -> l2@example.jp")
    assert isinstance(caught.value, AliasError)


def test_depth_limit_counts_the_longest_path_whatever_the_target_order() -> None:
    # all -> b -> d is 3 deep, all -> c -> b -> d is 4: too deep for 3, whichever path is walked first.
    for first, second in (("b", "c"), ("c", "b")):
        aliases = table(f"all: {first}@example.jp, {second}@example.jp", "c: b@example.jp", "b: d@example.jp",
                        "d: final@partner.jp")
        with pytest.raises(AliasTooDeep):
            expand(a("all@example.jp"), aliases, LOCAL, max_depth=3)
        assert expand(a("all@example.jp"), aliases, LOCAL, max_depth=4).finals == (a("final@partner.jp"),)


def test_alias_shared_by_many_paths_is_applied_once_and_quickly() -> None:
    # Ten layers of ten aliases, each naming every alias of the next layer: 10**10 paths.
    lines = [f"n{layer}x{i}: " + ", ".join(f"n{layer + 1}x{j}@example.jp" for j in range(10))
             for layer in range(9) for i in range(10)]
    lines += [f"n9x{i}: user{i}@partner.jp" for i in range(10)]
    started = time.monotonic()
    expansion = expand(a("n0x0@example.jp"), table(*lines), LOCAL)
    assert time.monotonic() - started < 5
    assert len(expansion.steps) == 1 + 8 * 10 + 10
    assert len({step.source for step in expansion.steps}) == len(expansion.steps)
    assert expansion.finals == tuple(a(f"user{i}@partner.jp") for i in range(10))


# Load-time checks


def test_check_loops_finds_nothing_in_a_good_table() -> None:
    aliases = table("all: staff@example.jp", "staff: alice@example.jp", "bob: bob@example.jp, archive@partner.jp")
    assert check_loops(aliases, LOCAL) == []


def test_check_loops_reports_each_loop_once_on_its_first_line() -> None:
    aliases = table(
        "outer: b@example.jp",
        "b: c@example.jp",
        "self: self@example.jp",
        "c: b@example.jp",
        "fine: alice@example.jp",
    )
    errors = check_loops(aliases, LOCAL)
    assert [(error.line, error.problem) for error in errors] == [
        (2, "alias loop: b@example.jp -> c@example.jp -> b@example.jp"),
        (3, "alias loop: self@example.jp -> self@example.jp"),
    ]
    assert str(errors[0]) == "aliases:2: alias loop: b@example.jp -> c@example.jp -> b@example.jp"


def test_check_loops_reports_too_deep_aliases_on_their_lines() -> None:
    errors = check_loops(chain_table(12), LOCAL)
    assert [error.line for error in errors] == [1, 2]
    assert all("nested deeper than 10" in error.problem for error in errors)


def test_bare_loop_is_reported_only_when_it_applies_in_a_local_domain() -> None:
    aliases = table("a: b@example.jp", "b: a@example.jp")
    assert check_loops(aliases, frozenset()) == []
    assert [error.line for error in check_loops(aliases, frozenset({"example.jp"}))] == [1]


# Properties over random alias graphs on a small address set

LOCALS = ("a", "b", "c", "d", "e")
GRAPH_DOMAINS = frozenset({"x.jp"})  # y.jp is remote
NAMES = st.sampled_from([*LOCALS, *(f"{local}@x.jp" for local in LOCALS), *(f"{local}@y.jp" for local in LOCALS)])
TARGETS = st.builds(
    lambda local, upper, domain: f"{local.upper() if upper else local}@{domain}",
    st.sampled_from(LOCALS), st.booleans(), st.sampled_from(["x.jp", "y.jp"]),
)
GRAPHS = st.dictionaries(NAMES, st.lists(TARGETS, min_size=1, max_size=4), max_size=10)
STARTS = st.builds(lambda local, domain: a(f"{local}@{domain}"), st.sampled_from(LOCALS), st.sampled_from(["x.jp", "y.jp"]))


def graph_table(graph: dict[str, list[str]]) -> Aliases:
    return table(*(f"{name}: {', '.join(targets)}" for name, targets in graph.items()))


def key(address: Address) -> Address:
    return Address(address.local.lower(), address.domain)


def same(address: Address) -> Address:
    """When two finals are one recipient: one mailbox in a local domain, exact elsewhere."""
    return key(address) if address.domain in GRAPH_DOMAINS else address


def successors(aliases: Aliases, address: Address) -> list[Address] | None:
    """The reference graph: None for a non-alias; an alias naming itself among others loses that edge."""
    entry = aliases.lookup(address, GRAPH_DOMAINS)
    if entry is None:
        return None
    others = [target for target in entry.targets if key(target) != key(address)]
    return others or [address]


def reference(aliases: Aliases, start: Address) -> tuple[bool, int, set[Address]]:
    """(a cycle is reachable from start, longest alias chain from start, the recipients reached)."""
    state: dict[Address, str] = {}
    depth: dict[Address, int] = {}
    reached: set[Address] = set()
    cycle = False

    def dfs(node: Address) -> int:
        nonlocal cycle
        following = successors(aliases, node)
        if following is None:
            reached.add(same(node))
            return 0
        entry = aliases.lookup(node, GRAPH_DOMAINS)
        assert entry is not None
        reached.update(same(target) for target in entry.targets if key(target) == key(node) and following != [node])
        state[key(node)] = "open"
        deepest = 0
        for target in following:
            mark = state.get(key(target))
            if mark == "open":
                cycle = True
            elif mark == "done":
                deepest = max(deepest, depth[key(target)])
            else:
                deepest = max(deepest, dfs(target))
        state[key(node)] = "done"
        depth[key(node)] = 1 + deepest
        return depth[key(node)]

    longest = dfs(start)
    return cycle, longest, reached


@given(GRAPHS, STARTS, st.integers(min_value=1, max_value=6))
def test_expansion_agrees_with_a_reference_graph_search(graph: dict[str, list[str]], start: Address, depth: int) -> None:
    aliases = graph_table(graph)
    has_cycle, longest, reached = reference(aliases, start)
    try:
        expansion = expand(start, aliases, GRAPH_DOMAINS, max_depth=depth)
    except AliasLoop as loop:
        assert has_cycle
        chain = loop.chain
        assert key(chain[0]) == key(start) and key(chain[-1]) in map(key, chain[:-1])
        for source, target in zip(chain, chain[1:]):
            assert key(target) in map(key, successors(aliases, source) or [])
        return
    except AliasTooDeep as too_deep:
        assert has_cycle or longest > depth
        assert len(too_deep.chain) == depth + 1
        return
    assert not has_cycle and longest <= depth

    finals = [same(final) for final in expansion.finals]
    assert len(finals) == len(set(finals)), "finals have no duplicates"
    assert set(finals) == reached
    sources = [key(step.source) for step in expansion.steps]
    assert len(sources) == len(set(sources)), "each alias is applied once"
    for final in expansion.finals:
        if aliases.lookup(final, GRAPH_DOMAINS) is not None:  # only by self-inclusion
            step = next(step for step in expansion.steps if key(step.source) == key(final))
            assert final in step.targets
    assert expansion.finals
    assert expand(start, aliases, GRAPH_DOMAINS, max_depth=depth) == expansion, "deterministic"


@given(GRAPHS)
def test_check_loops_is_empty_exactly_when_every_alias_expands(graph: dict[str, list[str]]) -> None:
    aliases = graph_table(graph)
    starts = [a(name if "@" in name else f"{name}@x.jp") for name in graph]
    failing = []
    for start in starts:
        try:
            expand(start, aliases, GRAPH_DOMAINS)
        except AliasError:
            failing.append(start)
    errors = check_loops(aliases, GRAPH_DOMAINS)
    assert bool(errors) == bool(failing)
    assert all(1 <= error.line <= len(graph) for error in errors)
