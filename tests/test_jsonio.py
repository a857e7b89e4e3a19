"""JSON Lines encoding of a batch: the fast path and the fallback give the same lines."""

import json

from hypothesis import given
from hypothesis import strategies as st

from dynvm_trace import jsonio

scalars = st.one_of(st.integers(-2**63, 2**63 - 1), st.booleans(), st.text(alphabet="{},:\"\\ab\n"))
records = st.lists(st.dictionaries(st.text(alphabet="{},ab", min_size=1), scalars | st.lists(scalars)),
                   max_size=20)


@given(records)
def test_each_record_is_one_line(recs):
    data = jsonio.dumps_lines(recs)
    lines = data.split(b"\n")
    assert lines.pop() == b""
    assert [json.loads(line) for line in lines] == recs


def test_a_string_holding_the_separator_takes_the_slow_path():
    recs = [{"comm": "a},{b"}, {"comm": "c"}]
    assert jsonio.dumps_lines(recs) == b'{"comm":"a},{b"}\n{"comm":"c"}\n'


def test_nothing_to_write():
    assert jsonio.dumps_lines([]) == b""
