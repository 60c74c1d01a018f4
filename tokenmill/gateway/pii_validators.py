"""Checks a PII pattern's match must also pass, so numbers that merely look right are let through.

A regex finds candidates; the checksum or parser decides. Each validator takes the matched text
and answers whether it is really that kind of data. Rules name them in the config
(``validator: luhn``); ``VALIDATORS`` is the registry.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

# Length of the IBAN per country (ISO 13616 registry). A country missing here is refused rather
# than guessed: mod-97 alone lets one random string in 97 through.
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30,
    "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}


def luhn_ok(text: str) -> bool:
    digits = [int(c) for c in text if c.isdigit()]
    if len(digits) < 12:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    """ISO 13616: the country's length, then the four first characters moved to the end, letters
    as 10..35, and the whole number mod 97 must be 1."""
    iban = "".join(text.split()).upper()
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban.isalnum() or not iban[2:4].isdigit():
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def ip_address_ok(text: str) -> bool:
    """A real IPv4 or IPv6 address by Python's own parser (no 999.1.1.1, no 10:30:00)."""
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    # "::" and "::1"-like shorthands, and C++ names such as "a::b", are hex but carry no
    # address; ask for at least four hex digits.
    return address.version == 4 or sum(c in "0123456789abcdefABCDEF" for c in text) >= 4


VALIDATORS: dict[str, Callable[[str], bool]] = {
    "luhn": luhn_ok, "iban": iban_ok, "ip": ip_address_ok,
}
