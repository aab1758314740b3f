"""Which keys sign a message (SPEC §9), and the key checks that stop start-up (issue 15, item 2)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from epost.config import DkimKeySpec
from epost.delivery import signing
from epost.delivery.signing import DkimKey, signing_keys

LABEL = st.sampled_from(["example", "test", "mail", "sub", "a", "b", "xample", "co"])
DOMAIN = st.lists(LABEL, min_size=1, max_size=4).map(".".join)


def fake_key(domain: str, selector: str) -> DkimKey:
    """signing_keys only looks at the domain: no key material needed."""
    return DkimKey(domain, selector, "ed25519", b"", "")


KEYS = st.lists(st.tuples(DOMAIN, st.sampled_from(["r1", "e1"])), max_size=6).map(
    lambda pairs: tuple(fake_key(d, s) for d, s in dict.fromkeys(pairs)))


@given(trusted=st.booleans(), leaves=st.booleans(), from_domain=DOMAIN, keys=KEYS)
def test_only_trusted_mail_leaving_over_smtp_is_ever_signed(trusted, leaves, from_domain, keys):
    chosen = signing_keys(trusted=trusted, leaves_over_smtp=leaves, from_domain=from_domain, keys=keys)
    if not (trusted and leaves):
        assert chosen == ()


@given(from_domain=DOMAIN, keys=KEYS)
def test_the_closest_domain_signs_with_every_one_of_its_keys(from_domain, keys):
    chosen = signing_keys(trusted=True, leaves_over_smtp=True, from_domain=from_domain, keys=keys)
    suffixes = [from_domain.split(".", i)[-1] for i in range(from_domain.count(".") + 1)]  # closest first
    matching = [s for s in suffixes if any(k.domain == s for k in keys)]
    if not matching:
        assert chosen == ()
    else:
        assert chosen == tuple(k for k in keys if k.domain == matching[0])


@given(parent=DOMAIN, label=LABEL)
def test_a_sibling_that_merely_ends_with_the_key_domain_is_never_signed(parent, label):
    keys = (fake_key(parent, "r1"),)
    assert signing_keys(trusted=True, leaves_over_smtp=True, from_domain=f"x{label}{parent}", keys=keys) == ()
    assert signing_keys(trusted=True, leaves_over_smtp=True, from_domain=f"{label}.{parent}", keys=keys) == keys


def test_from_domain_case_and_trailing_dot_do_not_matter():
    keys = (fake_key("example.test", "r1"),)
    assert signing_keys(trusted=True, leaves_over_smtp=True, from_domain="Mail.EXAMPLE.test.", keys=keys) == keys
    assert signing_keys(trusted=True, leaves_over_smtp=True, from_domain=None, keys=keys) == ()


# --- keys that stop start-up ------------------------------------------------------


def write_pem(path, key) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def test_an_rsa_key_under_2048_bits_is_refused_naming_the_file(tmp_path):
    small = tmp_path / "small.pem"
    write_pem(small, rsa.generate_private_key(public_exponent=65537, key_size=1024))
    with pytest.raises(signing.DkimKeyError, match=r"example.test/s1: .*small.pem is RSA-1024, need >= 2048"):
        signing.load_key("example.test", "s1", small)


def test_a_keygen_file_holding_another_type_is_refused(tmp_path):
    wrong = tmp_path / "example.test.s1.rsa.pem"
    write_pem(wrong, ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(signing.DkimKeyError, match="holds an ed25519 key but is named rsa"):
        signing.load_key("example.test", "s1", wrong)


def test_a_keygen_file_configured_under_another_selector_or_domain_is_refused(tmp_path):
    path, _ = signing.keygen("example.test", tmp_path, "e202611", "ed25519")
    with pytest.raises(signing.DkimKeyError, match=r"made for example.test.e202611 .*not example.test.e202612"):
        signing.load_key("example.test", "e202612", path)
    with pytest.raises(signing.DkimKeyError, match="not example.org.e202611"):
        signing.load_key("example.org", "e202611", path)
    assert signing.load_key("EXAMPLE.test", "e202611", path).algorithm == "ed25519"


def test_a_hand_named_key_file_is_taken_as_it_is(tmp_path):
    for name in ("dkim.pem", "mail.rsa.pem", "example.test.rsa.pem"):
        write_pem(tmp_path / name, rsa.generate_private_key(public_exponent=65537, key_size=2048))
        assert signing.load_key("example.test", "s1", tmp_path / name).algorithm == "rsa"


def test_one_selector_configured_twice_is_refused(tmp_path):
    path, _ = signing.keygen("example.test", tmp_path, "s1", "ed25519")
    specs = (DkimKeySpec("example.test", "s1", path), DkimKeySpec("Example.Test", "S1", path))
    with pytest.raises(signing.DkimKeyError, match="Example.Test/S1: configured twice"):
        signing.load_keys(specs)
    assert len(signing.load_keys(specs[:1])) == 1


def test_keys_reach_the_spool_worker_unchanged(tmp_path):
    keys = (signing.keygen("example.test", tmp_path, "r1", "rsa")[1],
            signing.keygen("example.test", tmp_path, "e1", "ed25519")[1])
    assert signing.keys_from_json(signing.keys_to_json(keys)) == keys


# --- where "trusted" comes from; check-config (start-up: tests/admin/test_dkim_keygen.py) -------------------------------


def test_trusted_origin_is_an_authenticated_client_or_one_in_relay_networks():
    import ipaddress

    from epost.smtp.interfaces import Session
    from epost.smtp.policy import RecipientPolicy

    policy = RecipientPolicy(None, local_domains=(), relay_domains=(), gateway=None, aliases=None,
                             relay_networks=(ipaddress.ip_network("192.0.2.0/24"),))

    def session(ip: str, user: str | None = None) -> Session:
        return Session("relay", ip, 2525, "client.test", True, None, user)

    assert policy.trusted(session("192.0.2.7"))
    assert policy.trusted(session("::ffff:192.0.2.7"))  # a dual-stack listener's view of it
    assert policy.trusted(session("198.51.100.1", user="alice@example.test"))
    assert not policy.trusted(session("198.51.100.1"))
    assert not policy.trusted(session("not an address"))


def test_check_config_names_a_selector_configured_twice(tmp_path, capsys):
    from epost.admin.cli import main

    path, _ = signing.keygen("example.test", tmp_path / "dkim", "s1", "ed25519")
    config = tmp_path / "epost.toml"
    entry = f'[[dkim.keys]]\ndomain = "example.test"\nselector = "s1"\nkey = "{path}"\n'
    config.write_text(f'[server]\nspool = "{tmp_path}/spool"\n' + entry + entry)
    assert main(["--config", str(config), "check-config"]) == 1
    assert "dkim key example.test/s1: configured twice" in capsys.readouterr().out
