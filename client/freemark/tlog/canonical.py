"""RFC 8785 (JCS) bytes, the only form of JSON the TTP signs or hashes, written fast.

Every log entry's body is serialised here on the log's append path (issue 21), where the
`rfc8785` package's writer (a `BytesIO` write and a regular-expression pass per value) was
the largest share of an entry's Python time. The values the TTP's statements are made of
(dicts with ASCII keys, lists, strings, integers in JSON's exact range, finite floats,
booleans, null) are written here with the standard library's C string escaper, whose escapes
are exactly RFC 8785's (``\\"``, ``\\\\``, ``\\b \\f \\n \\r \\t``, ``\\u00xx`` in lower-case
hex for the other control characters, nothing else escaped), and numbers in ECMAScript's
form (`_number`). Anything else (a subclass such as an enum, a key outside ASCII, whose
UTF-16 order may differ from Python's, an integer beyond 2**53 - 1, NaN, a lone surrogate)
is handed whole to `rfc8785`, so such input gets that package's bytes or its error: one
canonical form, two writers, and a property test that they agree on every JSON value
(tests/unit/client/tlog/test_canonical.py).
"""

from __future__ import annotations

import math
from json.encoder import encode_basestring  # the C escaper: RFC 8785's escapes, no others
from typing import Any

import rfc8785

__all__ = ["canonical_json"]

_SAFE_INTEGER = 2**53 - 1  # RFC 8785 §3.2.2.3: beyond it an integer is not exact in JSON


class _Unusual(Exception):
    """A value outside the fast writer's types: `rfc8785` writes (or refuses) the whole."""


def canonical_json(obj: Any) -> bytes:
    """RFC 8785 (JCS) bytes of `obj`: the only form of JSON the TTP signs or hashes."""
    try:
        return _value(obj).encode("utf-8")
    except (_Unusual, UnicodeEncodeError):
        return rfc8785.dumps(obj)


def _value(obj: Any) -> str:
    kind = type(obj)
    if kind is str:
        return encode_basestring(obj)  # type: ignore[no-any-return]  # typeshed: Any
    if kind is dict:
        for key in obj:
            if type(key) is not str or not key.isascii():  # ASCII: code point = UTF-16 order
                raise _Unusual
        return "{" + ",".join([encode_basestring(key) + ":" + _value(obj[key])
                               for key in sorted(obj)]) + "}"
    if kind is int:
        if -_SAFE_INTEGER <= obj <= _SAFE_INTEGER:
            return int.__repr__(obj)
        raise _Unusual
    if kind is float:
        return _number(obj)
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if kind is list or kind is tuple:
        return "[" + ",".join([_value(item) for item in obj]) + "]"
    raise _Unusual


def _number(value: float) -> str:
    """ECMAScript's Number::toString (ECMA-262 7.1.12.1), which RFC 8785 §3.2.2.3 adopts:
    the shortest digits that read back as `value` (Python's `repr` finds the same ones),
    placed without an exponent from 1e-6 up to 1e21 and with one (``1e-7``, ``1.5e+21``,
    no leading zeros) outside that range."""
    if not math.isfinite(value):
        raise _Unusual  # NaN and infinities are refused, with rfc8785's error
    if value == 0:
        return "0"  # -0 too
    text = repr(value)
    mantissa, _, exponent = text.partition("e")
    if not exponent:  # 1e-4 <= |value| < 1e16: Python's and ECMAScript's forms agree but ".0"
        return mantissa.removesuffix(".0")
    power = int(exponent)
    if not -7 < power < 21:  # both forms have an exponent: Python pads it to two digits
        return f"{mantissa}e{'+' if power > 0 else '-'}{abs(power)}"
    # Below 1e-4 or from 1e16 Python writes an exponent where ECMAScript writes the digits
    # out: value = 0.digits x 10**point, with 1e-6 <= |value| < 1e21.
    sign = ""
    if mantissa[0] == "-":
        sign, mantissa = "-", mantissa[1:]
    digits = mantissa.replace(".", "")
    point = power + 1
    if point <= 0:
        return sign + "0." + "0" * -point + digits
    if point < len(digits):
        return sign + digits[:point] + "." + digits[point:]
    return sign + digits + "0" * (point - len(digits))
