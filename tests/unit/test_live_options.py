"""The FFmpeg options :func:`mukv.video.live.open_live` opens a URL with, RTSP's transport above all
(RTP over TCP first, UDP when the server refuses TCP), checked against a stand-in for ``av.open``.

The real RTSP server these choices are made for is exercised in
``tests/integration/test_rtsp_source.py``.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from types import SimpleNamespace
from typing import Any

import av
import pytest

from mukv.errors import VideoError
from mukv.video.live import RTSP_TRANSPORTS, open_live

URL = "rtsp://viewer:s3cret@127.0.0.1:8554/live"


def bad_request() -> av.FFmpegError:
    return av.HTTPBadRequestError(errno.EINVAL, "Server returned 400 Bad Request")


def not_found() -> av.FFmpegError:
    return av.HTTPNotFoundError(errno.ENOENT, "Server returned 404 Not Found")


def unsupported_transport() -> av.FFmpegError:
    """What FFmpeg raises when the server answers its only transport with 461 Unsupported Transport."""
    try:
        av.error.err_check(-errno.EPROTONOSUPPORT)
    except av.FFmpegError as exc:
        return exc
    raise AssertionError("err_check raised nothing")


class Container:
    """An opened source with one video stream and no packets: its reader ends at once."""

    def __init__(self) -> None:
        self.streams = SimpleNamespace(video=[SimpleNamespace(average_rate=Fraction(25), guessed_rate=None)])

    def demux(self, stream: Any) -> Iterator[Any]:
        return iter(())

    def close(self) -> None:
        pass


class FakeOpen:
    """Stands in for ``av.open``: records each call's options and timeout; each call raises the next
    of ``outcomes`` (an exception factory) or, where it is ``None``, opens a :class:`Container`."""

    def __init__(self, *outcomes: Callable[[], BaseException] | None) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple[dict[str, str], tuple[float, float]]] = []

    def __call__(self, url: str, *, options: dict[str, str], timeout: tuple[float, float]) -> Container:
        self.calls.append((dict(options), timeout))
        outcome = self.outcomes.pop(0)
        if outcome is not None:
            raise outcome()
        return Container()

    @property
    def transports(self) -> list[str | None]:
        return [options.get("rtsp_transport") for options, _ in self.calls]


@pytest.fixture
def fake_open(monkeypatch) -> Callable[..., FakeOpen]:
    def install(*outcomes: Callable[[], BaseException] | None) -> FakeOpen:
        fake = FakeOpen(*outcomes)
        monkeypatch.setattr(av, "open", fake)
        return fake

    return install


def test_rtsp_asks_for_tcp_and_opens_over_it(fake_open):
    fake = fake_open(None)
    with open_live(URL, open_timeout_s=2.0, read_timeout_s=3.0) as stream:
        assert stream.next_batch(1, wait_s=1.0) is None and stream.exhausted and stream.error is None
    assert fake.transports == ["tcp"]
    options, timeout = fake.calls[0]
    assert "rtsp" in options["protocol_whitelist"].split(",") and "file" not in options["protocol_whitelist"]
    assert timeout == (3.0, 3.0)  # FFmpeg's own open limit is a second after open_live's


@pytest.mark.parametrize("refusal", [bad_request, unsupported_transport])
def test_rtsp_falls_back_to_udp_when_the_server_refuses_tcp(fake_open, refusal):
    fake = fake_open(refusal, None)
    started = time.monotonic()
    with open_live(URL, open_timeout_s=4.0) as stream:
        assert stream.next_batch(1, wait_s=1.0) is None and stream.error is None
    assert fake.transports == ["tcp", "udp"]
    # The second attempt gets what is left of the same open timeout, not a fresh one.
    assert fake.calls[0][1][0] == 5.0 and 4.0 < fake.calls[1][1][0] < 5.0
    assert time.monotonic() - started < 2.0
    assert {k: v for k, v in fake.calls[1][0].items() if k != "rtsp_transport"} == {
        k: v for k, v in fake.calls[0][0].items() if k != "rtsp_transport"
    }


def test_a_refusal_over_udp_too_is_reported_without_the_password(fake_open):
    fake = fake_open(bad_request, bad_request)
    with pytest.raises(VideoError, match="400 Bad Request") as caught:
        open_live(URL, open_timeout_s=2.0)
    assert fake.transports == ["tcp", "udp"]
    assert str(caught.value).startswith("rtsp://viewer:***@127.0.0.1:8554/live") and "s3cret" not in str(caught.value)


def test_other_errors_are_not_retried(fake_open):
    fake = fake_open(not_found)
    with pytest.raises(VideoError, match="404 Not Found"):
        open_live(URL, open_timeout_s=2.0)
    assert fake.transports == ["tcp"]


@pytest.mark.parametrize(
    ("kwargs", "transports"),
    [
        ({"rtsp_transport": "tcp"}, ["tcp"]),
        ({"rtsp_transport": "udp"}, ["udp"]),
        ({"options": {"rtsp_transport": "tcp"}}, ["tcp"]),  # an option given is used as given
        ({"rtsp_transport": "udp", "options": {"rtsp_transport": "tcp"}}, ["tcp"]),
    ],
)
def test_a_chosen_transport_is_the_only_one_tried(fake_open, kwargs, transports):
    fake = fake_open(bad_request)
    with pytest.raises(VideoError, match="400 Bad Request"):
        open_live(URL, open_timeout_s=2.0, **kwargs)
    assert fake.transports == transports


def test_rtsps_and_other_schemes_get_no_fallback(fake_open):
    fake = fake_open(bad_request)
    with pytest.raises(VideoError):
        open_live("rtsps://127.0.0.1:8322/live", open_timeout_s=2.0)
    assert fake.transports == ["tcp"]  # FFmpeg reads rtsps:// over its TLS connection only
    fake = fake_open(bad_request)
    with pytest.raises(VideoError):
        open_live("http://127.0.0.1:8080/live.ts", open_timeout_s=2.0)
    assert fake.transports == [None]  # rtsp_transport is an RTSP option only


def test_a_refusal_after_open_live_gave_up_is_not_retried(fake_open):
    def late_refusal() -> BaseException:
        time.sleep(0.6)  # the server answers after open_live's open timeout
        return bad_request()

    fake = fake_open(late_refusal, None)
    with pytest.raises(VideoError, match="open timeout"):
        open_live(URL, open_timeout_s=0.3)
    reader = next(thread for thread in threading.enumerate() if thread.name.startswith("mukv-live"))
    reader.join(5.0)
    assert not reader.is_alive() and fake.transports == ["tcp"]


@pytest.mark.parametrize("transport", ["TCP", "http", "", None, "tcp+udp"])
def test_an_unknown_transport_is_a_value_error(transport):
    with pytest.raises(ValueError, match="rtsp_transport"):
        open_live(URL, rtsp_transport=transport)
    assert RTSP_TRANSPORTS == ("auto", "tcp", "udp")


# -- how a URL is shown -------------------------------------------------------------------------------
SECRET = "S3cretPW"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rtsp://admin:S3cretPW@127.0.0.1:9/x", "rtsp://admin:***@127.0.0.1:9/x"),
        ("rtsp://admin:S3cret%40PW@127.0.0.1:9/x", "rtsp://admin:***@127.0.0.1:9/x"),
        # A user name alone is often an access token: hidden whole.
        ("rtsp://S3cretPW@127.0.0.1:9/x", "rtsp://***@127.0.0.1:9/x"),
        # Everything up to the authority's last "@" is user info, whatever a parser makes of the rest.
        ("rtsp://admin:S3cretPW@127.0.0.1:9\\@evil/x", "rtsp://admin:***@evil/x"),
        # Not a URL urlsplit reads (a bad IPv6 address): redacted as text.
        ("rtsp://admin:S3cretPW@[::1/x", "rtsp://***@[::1/x"),
        ("rtsp://[::1/x?apikey=S3cretPW&fps=1", "rtsp://[::1/x?apikey=***&fps=1"),
        # Credential-like query and fragment parameters, in any case; others stay.
        ("rtsp://127.0.0.1:9/x?password=S3cretPW", "rtsp://127.0.0.1:9/x?password=***"),
        (
            "https://cam/x.m3u8?a=1&Token=S3cretPW;X-Amz-Signature=S3cretPW&passwd=S3cretPW&pwd=S3cretPW",
            "https://cam/x.m3u8?a=1&Token=***;X-Amz-Signature=***&passwd=***&pwd=***",
        ),
        (
            "rtmp://h/app?key=S3cretPW&secret=S3cretPW&auth=S3cretPW&sig=S3cretPW#access_token=S3cretPW&t=3",
            "rtmp://h/app?key=***&secret=***&auth=***&sig=***#access_token=***&t=3",
        ),
        # Nothing to hide: the URL as given.
        ("rtsp://cam.local:554/stream?channel=1&subtype=0", "rtsp://cam.local:554/stream?channel=1&subtype=0"),
        ("srt://host:9000?mode=caller", "srt://host:9000?mode=caller"),
        ("not a url", "not a url"),
    ],
)
def test_urls_are_shown_without_their_credentials(url, shown):
    from mukv.video.live import redact_url

    assert redact_url(url) == shown
    assert SECRET not in redact_url(url)


def test_a_url_that_does_not_parse_is_named_without_its_password():
    with pytest.raises(VideoError) as caught:
        open_live("rtsp://admin:S3cretPW@[::1/x")
    assert SECRET not in str(caught.value) and "rtsp://***@[::1/x" in str(caught.value)
