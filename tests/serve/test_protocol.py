"""Request parsing (every bad field is a BadRequest naming it) and the stop-sequence filter."""
import pytest

from iteralite.serve.engine import StopFilter
from iteralite.serve.protocol import BadRequest, CompletionRequest, Limits, check_context, parse_request


def test_defaults_and_all_fields():
    assert parse_request(b'{"prompt": "Hi"}', Limits()) == CompletionRequest(prompt="Hi")
    req = parse_request(b'{"prompt": "", "max_tokens": 3, "temperature": 0, "top_p": 0.5, "top_k": 7, '
                        b'"seed": 9, "stream": true, "stop": "x", "model": "m", "n": 1}', Limits())
    assert req == CompletionRequest("", 3, 0.0, 0.5, 7, 9, True, ["x"])


@pytest.mark.parametrize("body,field", [
    (b"\xff\xfe{}", "body"),
    (b'{"prompt": "Hi"', "body"),
    (b'[1, 2]', "body"),
    (b'{"prompt": "Hi", "temperature": NaN}', "body"),
    (b'{}', "prompt"),
    (b'{"prompt": 5}', "prompt"),
    (b'{"prompt": ["a"]}', "prompt"),
    (b'{"prompt": "\\udc80"}', "prompt"),
    (b'{"prompt": "Hi", "max_tokens": "9"}', "max_tokens"),
    (b'{"prompt": "Hi", "max_tokens": 1.5}', "max_tokens"),
    (b'{"prompt": "Hi", "max_tokens": -1}', "max_tokens"),
    (b'{"prompt": "Hi", "max_tokens": 100000}', "max_tokens"),
    (b'{"prompt": "Hi", "temperature": "hot"}', "temperature"),
    (b'{"prompt": "Hi", "temperature": 1000}', "temperature"),
    (b'{"prompt": "Hi", "temperature": true}', "temperature"),
    (b'{"prompt": "Hi", "top_p": 0}', "top_p"),
    (b'{"prompt": "Hi", "top_k": -1}', "top_k"),
    (b'{"prompt": "Hi", "seed": -1}', "seed"),
    (b'{"prompt": "Hi", "seed": 1e3}', "seed"),
    (b'{"prompt": "Hi", "stream": "yes"}', "stream"),
    (b'{"prompt": "Hi", "stop": [1]}', "stop"),
    (b'{"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}', "stop"),
    (b'{"prompt": "Hi", "stop": ""}', "stop"),
    (b'{"prompt": "Hi", "max_token": 5}', "max_token"),
    (b'{"prompt": "Hi", "n": 2}', "n"),
])
def test_bad_requests_name_the_field(body, field):
    with pytest.raises(BadRequest) as e:
        parse_request(body, Limits(max_tokens=512))
    assert e.value.field == field, e.value.message
    assert field == "body" or field in e.value.message, e.value.message
    assert "--" not in e.value.message  # JSON field names, not the CLI's flags


def test_context_limit():
    req = CompletionRequest("x", max_tokens=10)
    check_context(90, req, Limits(context=100))
    with pytest.raises(BadRequest, match="context limit") as e:
        check_context(101, req, Limits(context=100))
    assert e.value.field == "prompt"
    with pytest.raises(BadRequest) as e:
        check_context(91, req, Limits(context=100))
    assert e.value.field == "max_tokens"


@pytest.mark.parametrize("pieces,stops,sent,hit", [
    (["ab", "c"], [], "abc", False),
    (["hello wo", "rld"], ["wor"], "hello ", True),
    (["a", "X", "Y", "b"], ["XYZ"], "aXYb", False),  # a partial stop is held, then let go
    (["aX", "YZb"], ["XYZ", "Yq"], "a", True),
    (["abc"], ["c", "b"], "a", True),  # the earliest stop wins
])
def test_stop_filter(pieces, stops, sent, hit):
    f, out = StopFilter(stops), []
    for p in pieces:
        out.append(f.feed(p))
        if f.hit:
            break
    out.append(f.flush() if not f.hit else "")
    assert "".join(out) == sent and f.hit == hit
