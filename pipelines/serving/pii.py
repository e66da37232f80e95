"""Personal data in questions: found by rules, replaced by typed placeholders before anything is
stored (the inference log, and so the drift reports, feedback and teacher exports and MLflow
artifacts made from it). The SQL sent to the database keeps the real value.

What the rules find, Korean and international formats, checksums where the format has one:

- EMAIL    local@domain.tld
- RRN      주민등록번호 / 외국인등록번호 YYMMDD-GNNNNNN: a real date and a gender digit 1-8; written
           without the hyphen (13 bare digits) it must also pass the check digit (numbers issued
           since October 2020 have none, so the hyphenated form is not checked)
- CARD     13-19 digits (spaces or hyphens allowed) with a card network's prefix and a valid Luhn
           check digit
- PHONE    Korean numbers (010-1234-5678, 01012345678, 02-123-4567, +82 10 1234 5678, 1588-1234)
           and international ones written with + or with separators ((555) 123-4567)
- ACCOUNT  an IBAN with a valid mod-97 check, a Korean account number written in 3-4 hyphenated
           groups of 11-14 digits, or digits right after "계좌" / "account"

Bare digit runs that do not start like a phone number (prices, years, ids, counts) and dates are
never masked. Names are not detected: a rule cannot tell a person's name from a product, a city
or a username, and a question filtering by a name is the product's ordinary use.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

KINDS = ("email", "rrn", "card", "phone", "account")
PLACEHOLDER = {k: f"<{k.upper()}>" for k in KINDS}

# ASCII-only boundaries: Korean particles follow numbers directly ("010-1234-5678으로").
_L, _R = r"(?<![0-9A-Za-z])", r"(?![0-9A-Za-z])"
_EMAIL = re.compile(
    r"(?<![\w.+-])[\w.%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![A-Za-z0-9_-])"
)
_IBAN = re.compile(r"(?<![0-9A-Za-z])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?" + _R)
_RRN = re.compile(_L + r"\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(\s?-\s?|)[1-8]\d{6}" + _R)
_CARD = re.compile(_L + r"\d(?:[ -]?\d){12,18}" + _R)
_PHONE = (
    # Korean: mobile, Seoul/regional, 070/050x, with or without the country code.
    re.compile(
        _L
        + r"(?:\+82[ -]?(?:\(0\))?|0)(?:1[016789]|2|[3-6][1-5]|70|50\d)[ .-]?\d{3,4}[ .-]?\d{4}"
        + _R
    ),
    re.compile(_L + r"1[5-8]\d{2}-\d{4}" + _R),  # 1588-1234 (nationwide numbers)
    re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){1,5}" + _R),  # +1 415 555 2671
    re.compile(r"(?<![\w(-])(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}" + _R),  # (555) 123-4567
)
_ACCOUNT_CUE = re.compile(
    r"(?:계좌|account|acct\.?|a/c)\s*(?:번호|number|no\.?|#)?\s*(?:는|은|이|가|:)?\s*"
    r"(\d(?:[ -]?\d){8,17})" + _R,
    re.I,
)
_ACCOUNT = re.compile(_L + r"\d{2,6}(?:-\d{2,7}){2,3}" + _R)
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2[2-7]|3[4-9]|30|6|9)")
_RRN_WEIGHTS = (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)


@dataclass(frozen=True)
class Found:
    start: int
    end: int
    kind: str
    text: str


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def rrn_check(digits: str) -> bool:
    """The 13th digit of a resident registration number (issued before October 2020)."""
    total = sum(int(d) * w for d, w in zip(digits[:12], _RRN_WEIGHTS, strict=True))
    return (11 - total % 11) % 10 == int(digits[12])


def luhn(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def iban_check(text: str) -> bool:
    s = text.replace(" ", "")
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _rrn(m: re.Match) -> bool:
    return bool(m.group(1)) or rrn_check(_digits(m.group(0)))


def _card(m: re.Match) -> bool:
    d = _digits(m.group(0))
    return 13 <= len(d) <= 19 and bool(_CARD_PREFIX.match(d)) and luhn(d)


def _phone(m: re.Match) -> bool:
    return 8 <= len(_digits(m.group(0))) <= 15


def _account(m: re.Match) -> bool:
    return 11 <= len(_digits(m.group(0))) <= 14


# Checked in this order; a later rule never takes text an earlier one found.
RULES: tuple[tuple[str, re.Pattern, object], ...] = (
    ("email", _EMAIL, None),
    ("account", _IBAN, lambda m: iban_check(m.group(0))),
    ("rrn", _RRN, _rrn),
    ("card", _CARD, _card),
    *(("phone", p, _phone) for p in _PHONE),
    ("account", _ACCOUNT_CUE, None),
    ("account", _ACCOUNT, _account),
)


def find(text: str, kinds: Iterable[str] = KINDS) -> list[Found]:
    """The personal data in `text` of the enabled `kinds`, in order of position."""
    kinds = set(kinds)
    found: list[Found] = []
    taken: list[tuple[int, int]] = []
    for kind, pattern, valid in RULES:
        if kind not in kinds:
            continue
        for m in pattern.finditer(text):
            group = 1 if pattern is _ACCOUNT_CUE else 0
            start, end = m.span(group)
            if any(start < e and s < end for s, e in taken):
                continue
            if valid is not None and not valid(m):
                continue
            taken.append((start, end))
            found.append(Found(start, end, kind, m.group(group)))
    return sorted(found, key=lambda f: f.start)


def mask(text: str, kinds: Iterable[str] = KINDS, also: Iterable[str] = ()) -> tuple[str, Counter]:
    """`text` with every finding replaced by its placeholder, and the count per kind. `also`:
    raw values found elsewhere (the question's), replaced wherever they occur in `text` too
    (the SQL written for a question carries its values)."""
    kinds = tuple(kinds)
    spans = find(text, kinds)
    counts = Counter(f.kind for f in spans)
    out, pos = [], 0
    for f in spans:
        out += [text[pos : f.start], PLACEHOLDER[f.kind]]
        pos = f.end
    out.append(text[pos:])
    masked = "".join(out)
    for value in sorted(set(also), key=len, reverse=True):
        if value in masked:
            kind = next((f.kind for f in find(value, kinds)), None)
            if kind is not None:
                masked = masked.replace(value, PLACEHOLDER[kind])
    return masked, counts
