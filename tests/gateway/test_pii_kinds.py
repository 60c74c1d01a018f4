"""PII kinds with validators: IBAN (mod-97), IPv4/IPv6 (Python's parser), street addresses.

The examples are the published sample IBANs of several countries' banks and registries, copied
from those sources and not made from the patterns; broken ones change one digit or swap two.
"""

from __future__ import annotations

import openai
import pytest

from tests.gateway.helpers import KEY_ACME, KEY_REDACT, base_config, chat
from tokenmill.gateway.pii_validators import iban_ok, ip_address_ok

VALID_IBANS = [
    "GB82 WEST 1234 5698 7654 32",          # United Kingdom
    "DE89 3704 0044 0532 0130 00",          # Germany
    "FR14 2004 1010 0505 0001 3M02 606",    # France (letters inside the account number)
    "NL91 ABNA 0417 1643 00",               # Netherlands
    "BE68 5390 0754 7034",                  # Belgium (16, short)
    "ES91 2100 0418 4502 0005 1332",        # Spain
    "CH93 0076 2011 6238 5295 7",           # Switzerland
    "IT60 X054 2811 1010 0000 0123 456",    # Italy
    "NO93 8601 1117 947",                   # Norway (15, the shortest)
    "MT84 MALT 0110 0001 2345 MTLC AST0 01S",  # Malta (31)
    "DE89370400440532013000",               # no spaces
]
BROKEN_IBANS = [
    "GB82 WEST 1234 5698 7654 33",          # last digit changed
    "DE89 3704 0044 0532 0130 01",
    "NL91 ABNA 0417 1634 00",               # two digits swapped
    "FR14 2004 1010 0505 0001 3M02 60",     # one character short for France
    "XX82 WEST 1234 5698 7654 32",          # no such country
]
IP_ADDRESSES = ["192.168.0.1", "8.8.8.8", "2001:db8::1", "fe80::1ff:fe23:4567:890a",
                "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "::ffff:192.0.2.128"]
NOT_IP_ADDRESSES = ["256.1.1.1", "999.10.10.10", "10:30:00", "00:1A:2B:3C:4D:5E", "a::b",
                    "1.2.3"]


@pytest.mark.parametrize("iban", VALID_IBANS)
def test_valid_ibans_pass_the_checksum(iban):
    assert iban_ok(iban)


@pytest.mark.parametrize("iban", BROKEN_IBANS)
def test_broken_ibans_fail_the_checksum(iban):
    assert not iban_ok(iban)


def test_ip_validator_uses_the_real_grammar():
    assert all(ip_address_ok(a) for a in IP_ADDRESSES)
    assert not any(ip_address_ok(a) for a in NOT_IP_ADDRESSES)


@pytest.fixture
def gw(upstreams, start_gateway, example_guardrails):
    (fake, server), _ = upstreams
    return start_gateway(base_config([server.url], guardrails=example_guardrails)), fake


BLOCKED = [
    (f"Please send the refund to {VALID_IBANS[0]} today", "pii.iban"),
    (f"My account is {VALID_IBANS[2]}.", "pii.iban"),
    (f"pay into {VALID_IBANS[10]}", "pii.iban"),
    ("The intruder logged in from 203.0.113.42 last night", "pii.ipv4"),
    ("my home router is at 2001:db8:85a3::8a2e:370:7334, can you check it", "pii.ipv6"),
    ("Deliver it to 221B Baker Street, London", "pii.street_address"),
    ("She lives at 1600 Pennsylvania Avenue NW", "pii.street_address"),
]
PASSING = [
    f"Is {BROKEN_IBANS[0]} a valid IBAN? The bank says no.",
    "Upgrade from version 1.2.3.4.5 to the next release",
    "The meeting is at 10:30:00 sharp",
    "My MAC address format looks like 00:1A:2B:3C:4D:5E, what is that?",
    "What does std::vector::push_back do?",
    "Python 3.12.1 changed the tokenizer",
    "I have 3 dogs and they love the way home from the park",
    "Chapter 12 covers the road ahead for the company",
    "Is 999.10.10.10 a valid address?",
]


@pytest.mark.parametrize(("prompt", "rule"), BLOCKED)
def test_each_pii_kind_is_blocked_and_named(gw, prompt, rule):
    gateway, fake = gw
    with pytest.raises(openai.BadRequestError) as blocked:
        chat(gateway.client(KEY_ACME), prompt)
    error = blocked.value.body
    assert error["code"] == "content_filter" and rule in error["message"]
    assert fake.num_requests == 0


def test_look_alikes_pass(gw):
    gateway, fake = gw
    for prompt in PASSING:
        chat(gateway.client(KEY_ACME), prompt)
    assert fake.num_requests == len(PASSING)


def test_redaction_of_new_kinds(gw):
    gateway, fake = gw
    chat(gateway.client(KEY_REDACT), f"Wire it to {VALID_IBANS[1]} from 198.51.100.7, "
                                     "ship to 742 Evergreen Terrace")
    sent = fake.bodies[-1]["messages"][0]["content"]
    assert sent == ("Wire it to [REDACTED:pii.iban] from [REDACTED:pii.ipv4], ship to "
                    "[REDACTED:pii.street_address]")
