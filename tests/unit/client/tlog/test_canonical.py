"""The fast RFC 8785 writer against the `rfc8785` package, byte for byte, on any JSON value.

Every signature and leaf hash of the log covers these bytes: a writer that differed from RFC
8785 on one value would sign bodies no other implementation reproduces. So the fast path is
checked against the reference package on generated values (every float, every string,
integers across JSON's exact range and past it, nested containers) and on the RFC's own
number examples, and its refusals are the package's.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from freemark.tlog.canonical import canonical_json

SAFE = 2**53 - 1

scalars = (st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False)
           | st.integers(min_value=-SAFE, max_value=SAFE) | st.text())
values = st.recursive(
    scalars,
    lambda inner: (st.lists(inner, max_size=5) | st.tuples(inner, inner)
                   | st.dictionaries(st.text(max_size=8), inner, max_size=5)),
    max_leaves=30,
)


@settings(max_examples=2_000, deadline=None)
@given(values)
def test_any_json_value_is_written_as_rfc8785_writes_it(value: Any) -> None:
    assert canonical_json(value) == rfc8785.dumps(value)


@settings(max_examples=5_000, deadline=None)
@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_every_finite_double_is_written_as_rfc8785_writes_it(bits: int) -> None:
    # Every bit pattern, so subnormals and both ends of the exponent range come up as often
    # as ordinary values.
    value = struct.unpack("<d", bits.to_bytes(8, "little"))[0]
    if math.isfinite(value):
        assert canonical_json(value) == rfc8785.dumps(value)


# RFC 8785 Appendix B: IEEE 754 doubles and their canonical text.
APPENDIX_B = {
    "0000000000000000": "0", "8000000000000000": "0", "0000000000000001": "5e-324",
    "8000000000000001": "-5e-324", "7fefffffffffffff": "1.7976931348623157e+308",
    "ffefffffffffffff": "-1.7976931348623157e+308", "4340000000000000": "9007199254740992",
    "c340000000000000": "-9007199254740992", "4430000000000000": "295147905179352830000",
    "44b52d02c7e14af5": "9.999999999999997e+22", "44b52d02c7e14af6": "1e+23",
    "44b52d02c7e14af7": "1.0000000000000001e+23", "444b1ae4d6e2ef4e": "999999999999999700000",
    "444b1ae4d6e2ef4f": "999999999999999900000", "444b1ae4d6e2ef50": "1e+21",
    "3eb0c6f7a0b5ed8c": "9.999999999999997e-7", "3eb0c6f7a0b5ed8d": "0.000001",
    "41b3de4355555553": "333333333.3333332", "41b3de4355555554": "333333333.33333325",
    "41b3de4355555555": "333333333.3333333", "41b3de4355555556": "333333333.3333334",
    "41b3de4355555557": "333333333.33333343", "becbf647612f3696": "-0.0000033333333333333333",
    "43143ff3c1cb0959": "1424953923781206.2",
}


@pytest.mark.parametrize(("bits", "text"), APPENDIX_B.items())
def test_the_rfcs_number_examples(bits: str, text: str) -> None:
    assert canonical_json(struct.unpack(">d", bytes.fromhex(bits))[0]) == text.encode()


def test_strings_escape_as_the_rfc_says() -> None:
    # Control characters as \u00xx in lower case, the short forms, '/' and DEL and U+2028
    # left alone, non-ASCII as UTF-8.
    text = "\x00\x1f\b\f\n\r\t\"\\/\x7f\u2028é\U0001f600"
    assert canonical_json(text) == rfc8785.dumps(text)
    assert canonical_json(text) == ('"\\u0000\\u001f\\b\\f\\n\\r\\t\\"\\\\/\x7f\u2028é'
                                    '\U0001f600"').encode()


def test_keys_sort_by_utf16_code_units_not_code_points() -> None:
    # U+FB33 sorts before U+1D11E by code point, after it by UTF-16 code unit (0xD834...).
    value = {"\U0001d11e": 1, "\ufb33": 2, "a": 3}
    assert canonical_json(value) == rfc8785.dumps(value)
    assert canonical_json(value) == '{"a":3,"\U0001d11e":1,"\ufb33":2}'.encode()


@pytest.mark.parametrize("value", [
    2**53, -(2**53), float("nan"), float("inf"), -float("inf"), "\ud800", {1: "a"},
    {"a": object()}, [set()],
])
def test_what_rfc8785_refuses_is_refused_the_same_way(value: Any) -> None:
    with pytest.raises(Exception) as reference:
        rfc8785.dumps(value)
    with pytest.raises(type(reference.value)):
        canonical_json(value)
